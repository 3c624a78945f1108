//! What the pools can ask of this host at once, against what the host has: reported by
//! `runnervisor check` and at start. Pure functions, tested from tables.

use crate::config::PoolConfig;

/// The most the pools can run at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Need {
    pub vms: usize,
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

/// What this host has for VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    pub cpus: u64,
    pub memory_mib: u64,
    /// The job storage pool's size.
    pub pool_gib: u64,
}

/// Every pool at its `max_vms`; under a host-wide cap, the cap filled with the largest
/// VMs (by memory) first.
pub fn worst_case(pools: &[PoolConfig], host_cap: Option<usize>) -> Need {
    let mut vms: Vec<(u64, u64, u64)> = pools
        .iter()
        .flat_map(|p| std::iter::repeat_n((p.memory_mib, u64::from(p.vcpus), p.disk_gib), p.max_vms))
        .collect();
    vms.sort_by(|a, b| b.cmp(a));
    vms.truncate(host_cap.unwrap_or(usize::MAX));
    vms.iter().fold(Need { vms: vms.len(), ..Need::default() }, |n, (m, c, d)| Need {
        memory_mib: n.memory_mib + m,
        vcpus: n.vcpus + c,
        disk_gib: n.disk_gib + d,
        ..n
    })
}

/// What does not fit, one sentence each (empty: everything fits). vCPUs may be
/// overcommitted up to 2 per host CPU (CI jobs rarely use every vCPU at once); memory and
/// disk are not (a full pool pauses VMs; an overcommitted host swaps or kills QEMU).
pub fn findings(need: &Need, host: &Host) -> Vec<String> {
    let mut out = Vec::new();
    if need.memory_mib > host.memory_mib {
        out.push(format!(
            "{} VMs may take {} MiB of memory, more than the host's {} MiB: lower max_vms or memory_mib, or set capacity.max_vms",
            need.vms, need.memory_mib, host.memory_mib
        ));
    }
    if need.vcpus > 2 * host.cpus {
        out.push(format!(
            "{} VMs may take {} vCPUs, more than twice the host's {} CPUs: lower max_vms or vcpus, or set capacity.max_vms",
            need.vms, need.vcpus, host.cpus
        ));
    }
    if need.disk_gib > host.pool_gib {
        out.push(format!(
            "{} VMs may grow their disks to {} GiB, more than the storage pool's {} GiB: lower max_vms or disk_gib, or enlarge the pool",
            need.vms, need.disk_gib, host.pool_gib
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max_vms: usize, vcpus: u32, memory_mib: u64, disk_gib: u64) -> PoolConfig {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:1\"\n[github]\norganization = \"o\"\nauth = {{ type = \"pat\", token = {{ file = \"/p\" }} }}\n\
             webhook_secret = {{ file = \"/s\" }}\n[[pool]]\nname = \"p\"\nlabels = [\"x\"]\nimage = \"/i\"\n\
             max_vms = {max_vms}\nvcpus = {vcpus}\nmemory_mib = {memory_mib}\ndisk_gib = {disk_gib}\n"
        );
        crate::config::Config::parse(&text).unwrap().pools.remove(0)
    }

    #[test]
    fn worst_cases() {
        let small = pool(4, 1, 1024, 10);
        let big = pool(2, 8, 16384, 100);
        let pools = [small.clone(), big.clone()];
        let table: Vec<(&str, Option<usize>, Need)> = vec![
            ("every pool full", None, Need { vms: 6, vcpus: 20, memory_mib: 36864, disk_gib: 240 }),
            ("a cap takes the largest first", Some(3), Need { vms: 3, vcpus: 17, memory_mib: 33792, disk_gib: 210 }),
            (
                "a cap above the sum changes nothing",
                Some(100),
                Need { vms: 6, vcpus: 20, memory_mib: 36864, disk_gib: 240 },
            ),
        ];
        for (what, cap, want) in table {
            assert_eq!(worst_case(&pools, cap), want, "{what}");
        }
    }

    #[test]
    fn what_does_not_fit_is_named() {
        let need = Need { vms: 6, vcpus: 20, memory_mib: 36864, disk_gib: 240 };
        let fits = Host { cpus: 16, memory_mib: 65536, pool_gib: 500 };
        assert!(findings(&need, &fits).is_empty());
        let tight = Host { cpus: 8, memory_mib: 32768, pool_gib: 200 };
        let f = findings(&need, &tight);
        assert_eq!(f.len(), 3, "{f:?}");
        assert!(f[0].contains("36864 MiB") && f[0].contains("32768 MiB"), "{f:?}");
        assert!(f[1].contains("20 vCPUs") && f[1].contains("8 CPUs"), "{f:?}");
        assert!(f[2].contains("240 GiB") && f[2].contains("200 GiB"), "{f:?}");
    }
}
