//! Config parsing and validation, from text.

use super::*;

pub(super) const MINIMAL: &str = r#"
    [server]
    listen = "127.0.0.1:8080"
    [github]
    organization = "octo-org"
    auth = { type = "pat", token = { file = "/etc/runnervisor/pat" } }
    webhook_secret = { credential = "webhook-secret" }
    [[pool]]
    name = "small"
    labels = ["self-hosted", "linux"]
    image = "/var/lib/runnervisor/images/golden.qcow2"
"#;

fn with(extra_github: &str, pool: &str) -> String {
    MINIMAL.replace("organization = \"octo-org\"", extra_github).replace("name = \"small\"", pool)
}

fn err(text: &str) -> String {
    Config::parse(text).unwrap_err().to_string()
}

#[test]
fn the_shipped_example_parses() {
    let text = include_str!("../../config.toml.example");
    let c = Config::parse(text).unwrap_or_else(|e| panic!("config.toml.example: {e}"));
    assert!(!c.pools.is_empty());
}

#[test]
fn defaults_are_filled_in() {
    let c = Config::parse(MINIMAL).unwrap();
    assert_eq!(c.libvirt.uri, "qemu:///system");
    assert_eq!(c.libvirt.domain_type, DomainType::Kvm);
    assert_eq!(
        c.libvirt.network,
        NetworkConfig::Network { name: "runnervisor".into(), filter: "runnervisor-fence".into(), allow: vec![] },
        "the default network is the fenced one"
    );
    assert_eq!(c.server.max_body_bytes, 1024 * 1024);
    assert_eq!(c.server.max_connections, 512);
    assert_eq!(c.server.max_connections_per_source, 16);
    assert_eq!(c.server.allow_sources, None, "any source by default");
    assert_eq!((c.server.header_timeout, c.server.body_timeout), (Duration::from_secs(10), Duration::from_secs(10)));
    assert_eq!(c.pools[0].registration, Registration::Jit);
    assert_eq!(c.github.web_url(), "https://github.com");
    assert_eq!(c.github.scope(), Scope::Organization("octo-org".into()));
    assert_eq!(c.github.scope().api_path(), "orgs/octo-org");
    assert!(matches!(c.github.auth, AuthConfig::Pat { .. }));
}

#[test]
fn network_modes_and_the_allow_list() {
    let net =
        |line: &str| Config::parse(&format!("{MINIMAL}\n[libvirt]\nnetwork = {line}\n")).map(|c| c.libvirt.network);
    let n = net(r#"{ type = "network", allow = ["10.20.0.5:443", "192.168.10.0/24:3128-3130"] }"#).unwrap();
    let (filter, allow) = n.fence().unwrap();
    assert_eq!(filter, "runnervisor-fence");
    assert_eq!(allow.iter().map(|a| a.to_string()).collect::<Vec<_>>(), ["10.20.0.5:443", "192.168.10.0/24:3128-3130"]);
    let n = net(r#"{ type = "bridge", name = "br0", filter = "lan-fence" }"#).unwrap();
    assert_eq!(n.fence().unwrap().0, "lan-fence");
    assert_eq!(net(r#"{ type = "user" }"#).unwrap(), NetworkConfig::User { accept_unfenced: false });
    assert!(net(r#"{ type = "user" }"#).unwrap().fence().is_none(), "slirp is not fenced");
    let e = net(r#"{ type = "network", allow = ["10.20.0.5"] }"#).unwrap_err().to_string();
    assert!(e.contains("allow") && e.contains("\"10.20.0.5\"") && e.contains("PORT"), "{e}");
    let e = net(r#"{ type = "network", allow = ["10.20.0.0/8:443"] }"#).unwrap_err().to_string();
    assert!(e.contains("10.20.0.0/8") && e.contains("host bits"), "{e}");
    let e = net(r#"{ type = "network", filter = "a b" }"#).unwrap_err().to_string();
    assert!(e.contains("libvirt.network.filter") && e.contains("a b"), "{e}");
    let e = net(r#"{ type = "user", allow = ["1.2.3.4:80"] }"#).unwrap_err().to_string();
    assert!(e.contains("allow"), "slirp takes no allow-list: {e}");
}

#[test]
fn listener_admission() {
    let server = |lines: &str| Config::parse(&MINIMAL.replace("[server]", &format!("[server]\n{lines}")));
    let c = server("allow_sources = [\"github\", \"192.0.2.0/24\", \"2001:db8::1\"]\nmax_connections_per_source = 512")
        .unwrap();
    let shown: Vec<String> = c.server.allow_sources.unwrap().iter().map(|r| r.to_string()).collect();
    assert_eq!(shown, ["github", "192.0.2.0/24", "2001:db8::1/128"]);
    let table: &[(&str, &[&str])] = &[
        ("allow_sources = [\"192.0.2.1/24\"]", &["allow_sources", "192.0.2.1/24", "host bits"]),
        ("allow_sources = [\"GitHub\"]", &["allow_sources", "GitHub", "not \"github\""]),
        ("allow_sources = []", &["server.allow_sources", "[]", "leave it out"]),
        (
            "max_connections_per_source = 0",
            &["server.max_connections_per_source", "0", "1 to server.max_connections (512)"],
        ),
        ("max_connections = 8\nmax_connections_per_source = 9", &["server.max_connections_per_source", "9"]),
    ];
    for (lines, want) in table {
        let e = server(lines).unwrap_err().to_string();
        for w in *want {
            assert!(e.contains(w), "{lines}: {e}");
        }
    }
}

#[test]
fn scope_admits_deliveries_of_its_own_only() {
    let repo = Scope::Repository { owner: "octo-org".into(), name: "app".into() };
    let org = Scope::Organization("octo-org".into());
    let ent = Scope::Enterprise("octo-ent".into());
    let table: &[(&Scope, &str, Option<&str>, bool)] = &[
        (&repo, "octo-org/app", None, true),
        (&repo, "Octo-Org/App", None, true),
        (&repo, "octo-org/app2", None, false),
        (&repo, "other/app", None, false),
        (&org, "octo-org/anything", None, true),
        (&org, "OCTO-ORG/x", Some("octo-ent"), true),
        (&org, "octo-org2/x", None, false),
        (&org, "evil/octo-org", None, false),
        (&ent, "any-org/x", Some("octo-ent"), true),
        (&ent, "any-org/x", Some("Octo-Ent"), true),
        (&ent, "any-org/x", Some("other-ent"), false),
        (&ent, "any-org/x", None, false),
    ];
    for (scope, repository, enterprise, want) in table {
        assert_eq!(scope.admits(repository, *enterprise), *want, "{scope:?} {repository} {enterprise:?}");
    }
}

#[test]
fn ghes_web_url_is_derived() {
    let c =
        Config::parse(&MINIMAL.replace("[github]", "[github]\napi_url = \"https://ghe.example.com/api/v3\"")).unwrap();
    assert_eq!(c.github.web_url(), "https://ghe.example.com");
}

#[test]
fn unknown_keys_are_refused_with_their_name() {
    let e = err(&MINIMAL.replace("[server]", "[server]\nlisten_port = 1"));
    assert!(e.contains("listen_port"), "{e}");
    let e = err(&format!("{MINIMAL}\nbogus = 1\n"));
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn bad_values_name_key_and_value() {
    let e = err(&with("organization = \"octo-org\"\nrepository = \"a/b\"", "name = \"small\""));
    assert!(e.contains("exactly one"), "{e}");
    let e = err(&with("repository = \"nonsense\"", "name = \"small\""));
    assert!(e.contains("github.repository") && e.contains("nonsense"), "{e}");
    let e = err(&with("organization = \"octo-org\"", "name = \"Big_Pool\""));
    assert!(e.contains("pool[0].name") && e.contains("Big_Pool"), "{e}");
    let e = err(&MINIMAL.replace("[\"self-hosted\", \"linux\"]", "[\"self-hosted\", \"a,b\"]"));
    assert!(e.contains("pool[0].labels") && e.contains("a,b"), "{e}");
    let e = err(&MINIMAL.replace("[\"self-hosted\", \"linux\"]", "[\"Linux\", \"linux\"]"));
    assert!(e.contains("duplicate"), "{e}");
    let e = err(&MINIMAL.replace("image = \"/var", "image = \"var"));
    assert!(e.contains("pool[0].image"), "{e}");
    let e = err(&format!("{MINIMAL}\nmax_vms = 2\nmax_vms_per_repository = 3\n"));
    assert!(e.contains("pool[0].max_vms_per_repository") && e.contains('3'), "{e}");
    let e = err(&format!("{MINIMAL}\nmax_vms = 2\nwarm = 3\n"));
    assert!(e.contains("pool[0].warm") && e.contains("max_vms (2)"), "{e}");
    let e = err(&format!("{MINIMAL}\nwarm_max_age = \"30s\"\n"));
    assert!(e.contains("pool[0].warm_max_age") && e.contains("30s"), "{e}");
    let e = err(&format!("{MINIMAL}\nsnapshot_slots = 65\n"));
    assert!(e.contains("pool[0].snapshot_slots") && e.contains("65") && e.contains("0 to 64"), "{e}");
    let bridge = MINIMAL.replace("[[pool]]", "[libvirt.network]\ntype = \"bridge\"\nname = \"br0\"\n[[pool]]");
    let e = err(&format!("{bridge}\nsnapshot_slots = 1\n"));
    assert!(e.contains("pool[0].snapshot_slots") && e.contains("type = \"network\""), "{e}");
    assert_eq!(Config::parse(&format!("{MINIMAL}\nsnapshot_slots = 2\n")).unwrap().pools[0].snapshot_slots, 2);
    let e = err(&format!("{MINIMAL}\nbind_timeout = \"0s\"\n"));
    assert!(e.contains("pool[0].bind_timeout"), "{e}");
    let c = Config::parse(&format!("{MINIMAL}\nmax_vms = 3\nwarm = 2\n")).unwrap();
    assert_eq!(
        (c.pools[0].warm, c.pools[0].warm_max_age, c.pools[0].bind_timeout),
        (2, Duration::from_secs(3600), Duration::from_secs(15))
    );
    let e = err(&MINIMAL.replace("[[pool]]", "[capacity]\nmax_vms = 0\n[[pool]]"));
    assert!(e.contains("capacity.max_vms"), "{e}");
    let e = err(&format!("{MINIMAL}\nmax_vms = 0\n"));
    assert!(e.contains("pool[0].max_vms") && e.contains('0'), "{e}");
    let e = err(&format!("{MINIMAL}\nidle_timeout = \"soon\"\n"));
    assert!(e.contains("invalid duration") && e.contains("soon"), "{e}");
    let e = err(&MINIMAL.replace("listen = \"127.0.0.1:8080\"", "listen = \"localhost\""));
    assert!(e.contains("listen"), "{e}");
    let e = err(&format!("log_level = \"verbose\"\n{MINIMAL}"));
    assert!(e.contains("log_level") && e.contains("verbose"), "{e}");
    let c = Config::parse(&format!("log_level = \"warn,runnervisor=debug\"\n{MINIMAL}")).unwrap();
    assert_eq!(c.log_level, "warn,runnervisor=debug");
    let e = err(&format!("{MINIMAL}\nrunner_user = \"root\"\n"));
    assert!(e.contains("runner_user"), "{e}");
    let e = err(&MINIMAL.replace("type = \"pat\"", "type = \"oauth\""));
    assert!(e.contains("oauth"), "{e}");
    let dup =
        format!("{MINIMAL}\n[[pool]]\nname = \"other\"\nlabels = [\"LINUX\", \"self-hosted\"]\nimage = \"/x.qcow2\"\n");
    assert!(err(&dup).contains("same label set"));
    let no_pools = format!("pool = []\n{}", &MINIMAL[..MINIMAL.find("[[pool]]").unwrap()]);
    let e = err(&no_pools);
    assert!(e.contains("at least one"), "{e}");
}

#[test]
fn fleet_settings_defaults_and_errors() {
    let fleet = |body: &str| format!("{MINIMAL}\n[fleet]\n{body}\n");
    let c =
        Config::parse(&fleet("postgres = { url = \"postgres://rv@db.example/runnervisor?sslmode=require\" }")).unwrap();
    let f = c.fleet.as_ref().unwrap();
    assert_eq!(
        (f.lease, f.cold_head_start, f.postgres.max_connections),
        (Duration::from_secs(60), Duration::from_secs(1), 8)
    );
    assert!(!f.host_id().is_empty(), "the host name by default");
    assert!(Config::parse(MINIMAL).unwrap().fleet.is_none(), "absent: a single host");
    let ok = Config::parse(&fleet(
        "host_id = \"hv-01\"\nlease = \"30s\"\ncold_head_start = \"2s\"\n\
         postgres = { url = \"host=db.example user=rv dbname=runnervisor\", password = { credential = \"pg\" }, ca_file = \"/etc/ssl/db.pem\", max_connections = 4 }",
    ))
    .unwrap();
    assert_eq!(ok.fleet.unwrap().host_id(), "hv-01");
    let table: &[(&str, &str, &str)] = &[
        ("host_id = \"hv 01\"\npostgres = { url = \"postgres://rv@db/x\" }", "fleet.host_id", "hv 01"),
        ("postgres = { url = \"postgres://rv:s3cret@db/x\" }", "fleet.postgres.url", "password"),
        ("postgres = { url = \"host=db user=rv password=s3cret\" }", "fleet.postgres.url", "password=***"),
        ("postgres = { url = \"postgres:///x\" }", "fleet.postgres.url", "no host"),
        ("postgres = { url = \"postgres://rv@db/x?sslmode=sometimes\" }", "fleet.postgres.url", "sslmode"),
        ("postgres = { url = \"postgres://rv@db/x\", max_connections = 0 }", "fleet.postgres.max_connections", "0"),
        ("lease = \"5s\"\npostgres = { url = \"postgres://rv@db/x\" }", "fleet.lease", "5s"),
        ("cold_head_start = \"40s\"\npostgres = { url = \"postgres://rv@db/x\" }", "fleet.cold_head_start", "40s"),
        ("postgres = { url = \"postgres://rv@db/x\", pasword = \"x\" }", "pasword", ""),
    ];
    for (body, key, want) in table {
        let e = err(&fleet(body));
        assert!(e.contains(key) && e.contains(want), "{body}: {e}");
        assert!(!e.contains("s3cret"), "a password never reaches an error: {e}");
    }
}

#[test]
fn urls_are_shown_without_their_password() {
    use super::validate::redact_url;
    assert_eq!(redact_url("postgres://rv:s3cret@db:5432/x"), "postgres://rv:***@db:5432/x");
    assert_eq!(redact_url("postgres://rv@db/x"), "postgres://rv@db/x");
    assert_eq!(redact_url("host=db password=s3cret user=rv"), "host=db password=*** user=rv");
    // Every other place tokio-postgres takes a password from (two readers found these),
    // and names it does not take (shown without their values).
    let table = [
        ("postgres://rv@db/x?password=s3cret", "postgres://rv@db/x?password=***"),
        ("postgresql://rv@db/x?sslmode=require&pass%77ord=s3cret", "postgresql://rv@db/x?sslmode=require&***"),
        ("postgres://rv:s3cret@db/x?password=s3cret", "postgres://rv:***@db/x?password=***"),
        ("postgres://db/x?password=s3cret@", "postgres://***@"),
        ("postgres://rv:ab?cd=ef@db/x", "postgres://rv:***@db/x"),
        ("postgres://rv:s3cret?x@db/x", "postgres://rv:***@db/x"),
        ("postgres://db/x?application_name=a:b@c", "postgres://***@c"),
        ("postgres://rv@db/x?Password=s3cret&password =s3cret", "postgres://rv@db/x?Password=***&password =***"),
        ("postgres://rv@db/x?password=s3&cret&sslmode=require", "postgres://rv@db/x?password=***&***&sslmode=require"),
        (
            "postgres://rv@db:5432,db2/x?sslmode=require&application_name=rv",
            "postgres://rv@db:5432,db2/x?sslmode=require&application_name=rv",
        ),
        ("host=db password = s3cret", "host=db password=***"),
        ("host=db password='se cret' user=rv", "host=db password=*** user=rv"),
        ("host=db password='s3\\'cret' user=rv", "host=db password=*** user=rv"),
        ("host=db password=s3\\ cret user=rv", "host=db password=*** user=rv"),
        ("host=db PASSWORD=s3cret user=rv", "host=db PASSWORD=*** user=rv"),
        ("host='a b' password='s3cret", "host='a b' password=[the rest is not shown]"),
        ("host=db s3cret", "host=db [the rest is not shown]"),
        ("host=db =s3cret", "host=db [the rest is not shown]"),
        ("host=a://rv:x@db password=s3cret", "host=a://rv:x@db password=***"),
    ];
    for (url, want) in table {
        assert_eq!(redact_url(url), want, "{url}");
    }
    let fleet = |body: &str| format!("{MINIMAL}\n[fleet]\n{body}\n");
    for url in [
        "postgres://rv@db/x?password=s3cret",
        "host=db password = s3cret",
        "host=db password='s3 cret'",
        "postgres://rv:ab?s3=ef@db/x",
        "postgres://rv@db/x?Password=s3cret",
    ] {
        let e = err(&fleet(&format!("postgres = {{ url = {url:?} }}")));
        assert!(e.contains("fleet.postgres.url") && !e.contains("s3"), "{url}: {e}");
    }
}

#[test]
fn a_pool_may_be_a_runner_scale_set() {
    let c = Config::parse(&format!("{MINIMAL}\nintake = \"scale_set\"\n")).unwrap();
    assert_eq!((c.pools[0].intake, c.pools[0].scale_set()), (Intake::ScaleSet, Some("small")));
    let c = Config::parse(&format!("{MINIMAL}\nintake = \"scale_set\"\nscale_set_name = \"rv-linux\"\n")).unwrap();
    assert_eq!(c.pools[0].scale_set(), Some("rv-linux"));
    assert_eq!(Config::parse(MINIMAL).unwrap().pools[0].scale_set(), None, "webhooks by default");
    let e = err(&format!("{MINIMAL}\nintake = \"scale_set\"\nscale_set_name = \"été\"\n"));
    assert!(e.contains("pool[0].scale_set_name") && e.contains("ASCII"), "{e}");
    let e = err(&format!("{MINIMAL}\nscale_set_name = \"rv\"\n"));
    assert!(e.contains("pool[0].scale_set_name") && e.contains("intake"), "{e}");
    let e = err(&format!("{MINIMAL}\nintake = \"scale_set\"\nregistration = \"token\"\n"));
    assert!(e.contains("pool[0].registration") && e.contains("jit"), "{e}");
    // Token registration: only where the operator accepts that a job may read the token.
    let e = err(&format!("{MINIMAL}\nregistration = \"token\"\n"));
    assert!(e.contains("pool[0].registration") && e.contains("accept_token_exposure = true"), "{e}");
    let c = Config::parse(&format!("{MINIMAL}\nregistration = \"token\"\naccept_token_exposure = true\n")).unwrap();
    assert_eq!(c.pools[0].registration, Registration::Token);
    let e = err(&format!("{MINIMAL}\nintake = \"pull\"\n"));
    assert!(e.contains("intake") && e.contains("pull"), "{e}");
    let two = format!(
        "{MINIMAL}\nintake = \"scale_set\"\n[[pool]]\nname = \"other\"\nlabels = [\"x\"]\nimage = \"/x.qcow2\"\nintake = \"scale_set\"\nscale_set_name = \"SMALL\"\n"
    );
    let e = err(&two);
    assert!(e.contains("pool[1].scale_set_name") && e.contains("\"small\""), "{e}");
    // A webhook pool whose labels the set's cover would take the set's jobs too.
    let covered = format!(
        "{MINIMAL}\nintake = \"scale_set\"\n[[pool]]\nname = \"hooked\"\nlabels = [\"Linux\"]\nimage = \"/x.qcow2\"\n"
    );
    let e = err(&covered);
    assert!(e.contains("pool[0].labels") && e.contains("\"hooked\""), "{e}");
}
