//! Database TLS through the sink URL, against a real server this test
//! starts: a second PostgreSQL (`initdb` on a free port) with a certificate
//! from a throwaway CA made by `openssl`. `sslmode=verify-full` with that CA
//! connects; with another CA it is refused; `require` (encrypt, check
//! nothing) connects either way, which is why the docs ask for verify-full.

use saltpipe::config::from_str_with_env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(what: &str, cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn openssl(dir: &Path, args: &str) {
    run(
        &format!("openssl {args}"),
        Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(dir),
    );
}

/// PostgreSQL refuses to run as root: as root, run it as `postgres`.
fn as_postgres(program: &str) -> Command {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

/// A PostgreSQL server with TLS, stopped on drop.
struct TlsPostgres {
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsPostgres {
    fn start(dir: tempfile::TempDir) -> TlsPostgres {
        let d = dir.path();
        openssl(
            d,
            "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=saltpipe-test-ca",
        );
        openssl(
            d,
            "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost",
        );
        std::fs::write(d.join("ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").expect("ext");
        openssl(
            d,
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile ext",
        );
        openssl(
            d,
            "req -x509 -newkey rsa:2048 -nodes -keyout wrong.key -out wrong.pem -days 2 -subj /CN=another-ca",
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let data = d.join("data");
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            run(
                "chmod",
                Command::new("chmod").args(["0755", d.to_str().expect("utf8")]),
            );
            run(
                "chown",
                Command::new("chown").args(["-R", "postgres:", d.to_str().expect("utf8")]),
            );
        }
        run(
            "initdb",
            as_postgres("initdb")
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
                .arg(&data),
        );
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1,127.0.0.2'\nunix_socket_directories = '{d}'\n\
             ssl = on\nssl_cert_file = '{d}/server.crt'\nssl_key_file = '{d}/server.key'\nfsync = off\n",
            d = d.display()
        );
        let mut pc = std::fs::read_to_string(data.join("postgresql.conf")).expect("conf");
        pc.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), pc).expect("conf");
        run(
            "pg_ctl start",
            as_postgres("pg_ctl")
                .args(["-w", "-t", "60", "-l"])
                .arg(d.join("log"))
                .arg("-D")
                .arg(&data)
                .arg("start"),
        );
        TlsPostgres {
            data,
            port,
            _dir: dir,
        }
    }

    fn dir(&self) -> &Path {
        self._dir.path()
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = as_postgres("pg_ctl")
            .args(["-m", "immediate", "-D"])
            .arg(&self.data)
            .arg("stop")
            .output();
    }
}

async fn connect(url: &str) -> Result<(), String> {
    let cfg = from_str_with_env(&format!("[sink]\nurl = \"{url}\"\n"), Path::new("t"), &[])
        .map_err(|e| e.to_string())?;
    cfg.sink
        .build()
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn verify_full_connects_with_the_right_ca_only() {
    let pg = TlsPostgres::start(tempfile::tempdir().expect("tempdir"));
    let base = format!("postgres://postgres@localhost:{}/postgres", pg.port);
    let ca = pg.dir().join("ca.pem");
    let wrong = pg.dir().join("wrong.pem");
    connect(&format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        ca.display()
    ))
    .await
    .expect("verify-full with the server's CA");
    let err = connect(&format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        wrong.display()
    ))
    .await
    .expect_err("verify-full with another CA");
    assert!(
        err.to_lowercase().contains("certificate") || err.to_lowercase().contains("tls"),
        "{err}"
    );
    // The name is checked too: the certificate names localhost and
    // 127.0.0.1, the server also listens on 127.0.0.2.
    let err = connect(&format!(
        "postgres://postgres@127.0.0.2:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port,
        ca.display()
    ))
    .await
    .expect_err("a name the certificate does not carry");
    assert!(
        err.to_lowercase().contains("certificate") || err.to_lowercase().contains("name"),
        "{err}"
    );
    // require encrypts but trusts anyone: it connects with the wrong CA.
    connect(&format!(
        "{base}?sslmode=require&sslrootcert={}",
        wrong.display()
    ))
    .await
    .expect("require checks nothing");
}
