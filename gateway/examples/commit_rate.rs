//! Durable deliveries per second: one fsync per delivery against the store's group commit.
//!
//! `cargo run --release -p shoal-gateway --example commit_rate [deliveries]`
//! Prints figures; asserts nothing. The database goes to a temporary directory.

use std::sync::mpsc;
use std::time::{Instant, SystemTime};

use rand::SeedableRng;
use rand::rngs::StdRng;
use shoal_gateway::{Mailbox, MailboxConfig, Store, StoreConfig};
use shoal_packet::SPHINX_PAYLOAD_SIZE;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5000);
    let dir = tempfile::tempdir()?;
    let (store, recovered) = Store::open(
        &dir.path().join("rate.redb"),
        &StoreConfig::default(),
        &mut StdRng::seed_from_u64(1),
    )?;
    let mut mailbox = Mailbox::restore(MailboxConfig::default(), recovered)?;
    let address = [7u8; 32];
    mailbox.create_account(&address, [8u8; 32], u32::MAX)?;
    let payload = [0u8; SPHINX_PAYLOAD_SIZE];
    let now = SystemTime::now();

    // One delivery, one commit, wait: the rate without group commit.
    let single = (n / 20).max(10);
    let start = Instant::now();
    for _ in 0..single {
        mailbox.deliver(&address, [0; 16], &payload, now);
        while let Some(batch) = mailbox.poll_write() {
            mailbox.on_commit(store.commit(batch));
        }
    }
    let single_rate = single as f64 / start.elapsed().as_secs_f64();

    // Every delivery submitted at once; the writer groups whatever is queued.
    let before = store.stats();
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    for _ in 0..n {
        mailbox.deliver(&address, [0; 16], &payload, now);
        if let Some(batch) = mailbox.poll_write() {
            let tx = tx.clone();
            if let Err(failed) = store.submit(batch, move |r| {
                let _ = tx.send(r);
            }) {
                mailbox.on_commit_failed(&failed);
            }
        }
    }
    drop(tx);
    for result in rx {
        mailbox.on_commit(result);
    }
    let batched_rate = n as f64 / start.elapsed().as_secs_f64();
    let after = store.stats();
    let commits = after.commits - before.commits;

    println!("one commit per delivery: {single_rate:>9.0} deliveries/s ({single} deliveries)");
    println!(
        "group commit:            {batched_rate:>9.0} deliveries/s ({n} deliveries in {commits} commits, {:.1} per commit)",
        n as f64 / commits.max(1) as f64
    );
    println!("ratio: {:.1}x", batched_rate / single_rate);
    store.close()?;
    Ok(())
}
