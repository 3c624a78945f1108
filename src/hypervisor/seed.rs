//! The NoCloud seed: a small FAT image labelled `CIDATA` holding `user-data`, `meta-data`
//! and optionally `network-config`, built in memory (no tools, no loop mounts) and
//! uploaded as a volume.

use std::io::{Cursor, Write};

/// Least size of the seed image: a valid FAT12 volume holding what we write (an empty
/// cloud-config, the instance's name and, with fixed addresses, a network-config: well
/// under 1 KiB; secrets come over virtio-serial, never in the seed). It was 1 MiB, zeroed
/// and formatted for every VM: 5% of the simulator's time.
const MIN_SIZE: usize = 64 * 1024;

/// Formats tried larger, [`GROW`] each, when a size is one FAT cannot be made on.
const FORMAT_TRIES: u32 = 4;
const GROW: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("building the cloud-init seed image")]
pub struct SeedError(#[from] std::io::Error);

/// Builds the seed image bytes.
pub fn nocloud_image(user_data: &str, meta_data: &str, network_config: Option<&str>) -> Result<Vec<u8>, SeedError> {
    let mut files = vec![("user-data", user_data), ("meta-data", meta_data)];
    files.extend(network_config.map(|n| ("network-config", n)));
    let payload: usize = files.iter().map(|(_, c)| c.len()).sum();
    let mut size = (payload * 2 + 16 * 1024).max(MIN_SIZE).next_multiple_of(512);
    let mut tries = 0;
    let mut disk = loop {
        let mut disk = Cursor::new(vec![0u8; size]);
        match fatfs::format_volume(&mut disk, fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     ")) {
            Ok(()) => break disk,
            // A few sizes fit neither FAT12's cluster counts nor FAT16's ("unfortunate disk
            // size", around 4.2 MB: a `seed-image` of 2 MiB of user-data): larger ones do.
            Err(_) if tries < FORMAT_TRIES => {
                tries += 1;
                size += GROW;
            }
            Err(e) => return Err(e.into()),
        }
    };
    disk.set_position(0);
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        let root = fs.root_dir();
        for (name, content) in files {
            let mut f = root.create_file(name)?;
            f.truncate()?;
            f.write_all(content.as_bytes())?;
            f.flush()?;
        }
        drop(root);
        fs.unmount()?;
    }
    Ok(disk.into_inner())
}

/// A file of a seed image (what the guest's cloud-init reads; the fleet simulator's fake
/// guests read their runner's credential from it).
pub fn read_file(image: &[u8], name: &str) -> Result<String, SeedError> {
    use std::io::Read;
    // fatfs wants a writable device even to read: a copy (a seed is 64 KiB).
    let mut cur = Cursor::new(image.to_vec());
    let fs = fatfs::FileSystem::new(&mut cur, fatfs::FsOptions::new())?;
    let mut s = String::new();
    fs.root_dir().open_file(name)?.read_to_string(&mut s)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Payloads whose image size FAT cannot be formatted at (a `seed-image` of about 2 MiB
    /// of user-data) get a larger image, not an error.
    #[test]
    fn an_image_of_an_unfortunate_size_is_made_larger() {
        for half_kib in 4090..4110 {
            let user_data = "x".repeat(half_kib * 512);
            let img = nocloud_image(&user_data, "{}", None).unwrap_or_else(|e| panic!("{half_kib}: {e:?}"));
            assert_eq!(read_file(&img, "user-data").unwrap().len(), user_data.len());
        }
    }

    #[test]
    fn seed_has_label_and_files() {
        let img = nocloud_image("#cloud-config\n{}\n", "{\"instance-id\": \"rv-x-1\"}\n", Some("{\"version\": 2}\n"))
            .unwrap();
        assert_eq!(img.len() % 512, 0);
        let mut cur = Cursor::new(img.clone());
        let fs = fatfs::FileSystem::new(&mut cur, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim(), "CIDATA");
        drop(fs);
        assert_eq!(read_file(&img, "user-data").unwrap(), "#cloud-config\n{}\n");
        assert_eq!(read_file(&img, "network-config").unwrap(), "{\"version\": 2}\n");
        assert!(read_file(&img, "vendor-data").is_err());
        let without = nocloud_image("#cloud-config\n{}\n", "{}", None).unwrap();
        assert!(read_file(&without, "network-config").is_err(), "no network-config: the image's own (DHCP)");
        // blkid (what cloud-init uses to find the seed) sees the label too.
        let dir = crate::test_support::tempdir();
        let path = dir.join("seed.img");
        std::fs::write(&path, &img).unwrap();
        let out = std::process::Command::new("blkid")
            .args(["-o", "value", "-s", "LABEL"])
            .arg(&path)
            .output()
            .expect("blkid (util-linux) runs");
        assert!(out.status.success(), "blkid: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "CIDATA");
    }

    #[test]
    fn large_user_data_fits() {
        let big = "x".repeat(3 * 1024 * 1024);
        let img = nocloud_image(&big, "{}", None).unwrap();
        let mut cur = Cursor::new(img);
        let fs = fatfs::FileSystem::new(&mut cur, fatfs::FsOptions::new()).unwrap();
        let mut s = String::new();
        fs.root_dir().open_file("user-data").unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s.len(), big.len());
    }
}
