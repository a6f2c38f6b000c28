//! Three `fz-portal serve` replicas on one PostgreSQL database, in the world's portal
//! namespace (on the wan, at 198.18.0.1, ports 8091 to 8093), set up as docs/deploy.md says:
//! `fz-portal init` once on the first, whose key files the others name; each with a data
//! directory of its own, the world's policy tree, and a short drain period. The PostgreSQL
//! server is the test process's (`fz_host::testing::postgres`), started in the portal's
//! namespace so that the replicas reach it on its loopback.
//!
//! Agents connect through [`Replicas::at`], naming the replicas they may use.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use fz_host::testing::WAIT;
use fz_host::testing::metrics::http_get;
use fz_host::testing::process::Process;

use crate::binaries::binary;
use crate::world::{ACCOUNT, PortalAt, World, admin};

/// How many replicas [`Replicas::start`] runs.
pub const REPLICAS: usize = 3;

/// The replicas, each running or stopped.
#[derive(Debug)]
pub struct Replicas {
    processes: Vec<Option<Process>>,
    configs: Vec<PathBuf>,
    /// The grant-signing public key every replica shares.
    pub key: String,
    /// How many times each was started (its log file's number).
    starts: Vec<u32>,
    /// The world's directory, where the logs go (kept with the world's when a scenario fails).
    logs: PathBuf,
}

impl Replicas {
    /// Makes the database, runs `init` with the first replica's configuration, and starts all
    /// three; `Err` says why there is no PostgreSQL here.
    pub fn start(world: &World) -> Result<Replicas, String> {
        let database = world.portal_ns.run(|| {
            fz_host::testing::postgres::server().map(fz_host::testing::postgres::Postgres::database)
        })?;
        let dir = world.dir().join("replicas");
        std::fs::create_dir_all(&dir).unwrap();
        let keys = dir.join("replica-0");
        let configs: Vec<PathBuf> = (0..REPLICAS)
            .map(|index| {
                let config = dir.join(format!("replica-{index}.toml"));
                let key_files = match index {
                    0 => String::new(),
                    _ => format!(
                        "signing_key_file = \"{}\"\ntoken_key_file = \"{}\"\n",
                        keys.join("portal-signing.key").display(),
                        keys.join("token.key").display(),
                    ),
                };
                std::fs::write(
                    &config,
                    format!(
                        "listen = \"{}\"\nallow_plain_http = true\ndata_dir = \"{}\"\n\
                         database_url = \"{database}\"\ndrain_period_ms = 500\n{key_files}\n\
                         [[accounts]]\nslug = \"{ACCOUNT}\"\npolicy = \"{}\"\n\
                         request_burst = 1000\n",
                        listen(index),
                        dir.join(format!("replica-{index}")).display(),
                        world.tree().display(),
                    ),
                )
                .unwrap();
                config
            })
            .collect();
        admin(&world.portal_ns, &configs[0], &["init"]);
        let key = admin(&world.portal_ns, &configs[0], &["public-key"])
            .trim()
            .to_owned();
        let mut replicas = Replicas {
            processes: (0..REPLICAS).map(|_| None).collect(),
            configs,
            key,
            starts: vec![0; REPLICAS],
            logs: world.dir().to_owned(),
        };
        for index in 0..REPLICAS {
            replicas.start_one(world, index);
        }
        Ok(replicas)
    }

    /// The replicas `which` as a portal agents connect to (admin commands go to the first).
    pub fn at(&self, which: &[usize]) -> PortalAt {
        let urls: Vec<String> = which
            .iter()
            .map(|index| format!("ws://{}", listen(*index)))
            .collect();
        PortalAt {
            urls: urls.join(","),
            key: self.key.clone(),
            config: self.configs[which[0]].clone(),
        }
    }

    /// Where replica `index` listens.
    pub fn address(&self, index: usize) -> SocketAddr {
        listen(index)
    }

    /// Replica `index`'s process; panics if it is stopped.
    pub fn process(&self, index: usize) -> &Process {
        self.processes[index]
            .as_ref()
            .unwrap_or_else(|| panic!("replica {index} is stopped"))
    }

    /// `kill -9` of replica `index`, as a crash of its machine would end it.
    pub fn kill(&mut self, index: usize) {
        if let Some(process) = self.processes[index].take() {
            process.kill();
        }
    }

    /// SIGTERM to replica `index` (it drains), then starts it again once it has exited.
    pub fn restart(&mut self, world: &World, index: usize) {
        if let Some(process) = self.processes[index].take() {
            let status = process.terminate();
            assert!(status.success(), "replica {index} exited with {status}");
        }
        self.start_one(world, index);
    }

    /// Starts replica `index` and waits for its `/healthz`.
    fn start_one(&mut self, world: &World, index: usize) {
        self.starts[index] += 1;
        let log = self
            .logs
            .join(format!("replica-{index}-{}.log", self.starts[index]));
        let config = self.configs[index].to_str().unwrap().to_owned();
        let process = Process::start(
            &format!("fz-portal (replica {index})"),
            &world.portal_ns,
            &binary("fz-portal"),
            &["serve", "--config", &config],
            "info",
            log,
        );
        fz_host::testing::wait_for(
            &format!("replica {index}'s /healthz"),
            WAIT,
            |what| process.assert_running(what),
            || {
                world
                    .portal_ns
                    .run(|| http_get(listen(index), "/healthz"))
                    .ok()
            },
        );
        self.processes[index] = Some(process);
    }
}

/// Where replica `index` listens: on the wan, beside the world's own portal.
fn listen(index: usize) -> SocketAddr {
    let port = 8091 + u16::try_from(index).unwrap_or(0);
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), port)
}
