//! A lease-guarded worker: three worker processes compete for the nightly report. Each
//! round, one holds the lease, and every write it makes carries the fencing token; the
//! report file refuses tokens older than the newest it has seen, so a worker that stalls
//! past its lease can never overwrite a newer worker's output.
//!
//! ```sh
//! cargo run --example lease_worker
//! ```

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agentbus::Bus;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [name, dir] = &args[..] {
        return work(name, Path::new(dir));
    }
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join(".agentbus");
    Bus::init(&root)?;
    let me = std::env::current_exe()?;
    let workers: Vec<_> = (1..=3)
        .map(|i| {
            Command::new(&me)
                .arg(format!("worker-{i}"))
                .arg(&root)
                .spawn()
        })
        .collect::<std::result::Result<_, _>>()?;
    for mut w in workers {
        w.wait()?;
    }
    println!("{}", std::fs::read_to_string(root.join("report.txt"))?);
    Ok(())
}

/// The protected resource: appends a line only for a token at least as new as the
/// newest it has accepted. The check and the write are one step under the resource's
/// own lock, as a real fenced store (a database, an object store's conditional write)
/// does it: otherwise a stale writer could pass the check and write after a newer one.
fn fenced_append(root: &Path, token: u64, line: &str) -> Result<()> {
    let guard = std::fs::File::create(root.join("report.lock"))?;
    guard.lock()?;
    let fence = root.join("report.token");
    let newest: u64 = std::fs::read_to_string(&fence)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if token < newest {
        return Err(format!("refused stale token {token} (newest {newest})").into());
    }
    std::fs::write(&fence, token.to_string())?;
    let mut text = std::fs::read_to_string(root.join("report.txt")).unwrap_or_default();
    text.push_str(line);
    text.push('\n');
    std::fs::write(root.join("report.txt"), text)?;
    Ok(())
}

fn work(name: &str, root: &Path) -> Result<()> {
    let bus = Bus::builder().agent(name).open(root)?;
    for round in 0..3 {
        let lease = bus
            .lease("nightly-report")
            .ttl(Duration::from_secs(10))
            .process_bound(true)
            .acquire(Duration::from_secs(30))?;
        fenced_append(
            root,
            lease.token(),
            &format!("token {:>2}: {name} wrote part {round}", lease.token()),
        )?;
        std::thread::sleep(Duration::from_millis(20));
        lease.release()?;
    }
    Ok(())
}
