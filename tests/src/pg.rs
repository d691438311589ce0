//! A real PostgreSQL server for one test: `initdb` into a temporary
//! directory (as the `postgres` user when the tests run as root, since the
//! server refuses root), then `postgres` listening on a Unix socket in that
//! directory only (`listen_addresses = ''`): no TCP port, so nothing is
//! guessed and nothing is reachable from elsewhere. Stopped and removed when
//! dropped; [`Postgres::stop`] and [`Postgres::start_again`] make an outage.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::gateway::temp_dir;

/// The newest PostgreSQL under `/usr/lib/postgresql/<version>/bin`.
pub fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").is_file().then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .expect("PostgreSQL is not installed: apt-get install -y postgresql")
}

/// `program` from PostgreSQL's bin directory, as the `postgres` user when
/// we are root.
fn pg_command(program: &str) -> Command {
    let path = bin_dir().join(program);
    if crate::is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

/// A running server.
#[derive(Debug)]
pub struct Postgres {
    dir: PathBuf,
    running: bool,
}

impl Postgres {
    /// initdb and start; panics with the server's log if it does not come up
    /// within 30 s.
    pub fn start() -> Postgres {
        let dir = temp_dir("pg");
        if crate::is_root() {
            let ok = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown {} to postgres", dir.display());
        }
        let out = pg_command("initdb")
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            dir,
            running: false,
        };
        pg.start_again();
        pg
    }

    /// The directory of its socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// A connection string for `[store] url` (the `postgres` database).
    pub fn url(&self) -> String {
        format!("host={} user=postgres dbname=postgres", self.dir.display())
    }

    /// The `[store]` table of a gateway on this server, its local snapshot
    /// in the gateway's directory.
    pub fn store_table(&self) -> String {
        format!(
            "[store]\nurl = {:?}\nsnapshot = \"@DIR@/splicegate-snapshot.json\"\n",
            self.url()
        )
    }

    /// Starts the server (again, after [`Postgres::stop`]) and waits until
    /// it accepts connections (`pg_ctl start -w`).
    pub fn start_again(&mut self) {
        assert!(!self.running, "already running");
        let options = format!(
            "-k {} -c listen_addresses= -c fsync=off -c full_page_writes=off -c max_connections=50",
            self.dir.display()
        );
        let out = pg_command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "30", "-o", &options, "start"])
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl start");
        assert!(
            out.status.success(),
            "postgres did not start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        self.running = true;
    }

    /// Stops the server (`pg_ctl stop -m fast`: open connections are
    /// closed), waiting until it is gone.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        for mode in ["fast", "immediate"] {
            let ok = pg_command("pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-m", mode, "-w", "-t", "20", "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
        }
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Runs one SQL statement in the `postgres` database with `psql`; its
    /// output (unaligned, no headers).
    pub fn sql(&self, statement: &str) -> String {
        self.sql_in("postgres", statement)
    }

    /// [`Postgres::sql`] in database `db`.
    pub fn sql_in(&self, db: &str, statement: &str) -> String {
        let out = Command::new(bin_dir().join("psql"))
            .arg("-h")
            .arg(&self.dir)
            .args([
                "-U",
                "postgres",
                "-d",
                db,
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
            ])
            .arg(statement)
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {statement:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
