use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize};

use super::*;

/// A fake VM: a serial number; dropping it counts as destroyed.
struct FakeVm {
    serial: u64,
    alive: Arc<AtomicUsize>,
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A source that makes numbered VMs after `delay`, failing the restores whose number is in
/// `fail`.
struct FakeSource {
    next: AtomicU64,
    alive: Arc<AtomicUsize>,
    made: AtomicUsize,
    delay: Duration,
    fail: Mutex<HashSet<u64>>,
}

impl FakeSource {
    fn new(delay: Duration) -> Arc<Self> {
        Arc::new(FakeSource {
            next: AtomicU64::new(0),
            alive: Arc::new(AtomicUsize::new(0)),
            made: AtomicUsize::new(0),
            delay,
            fail: Mutex::new(HashSet::new()),
        })
    }
    fn alive(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Source for FakeSource {
    type Vm = FakeVm;
    async fn make(&self, _profile: &ProfileSpec) -> Result<FakeVm, String> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        if self.fail.lock().unwrap().contains(&n) {
            return Err(format!("injected failure of restore {n}"));
        }
        self.made.fetch_add(1, Ordering::SeqCst);
        self.alive.fetch_add(1, Ordering::SeqCst);
        Ok(FakeVm {
            serial: n,
            alive: Arc::clone(&self.alive),
        })
    }
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn ready(pool: &Pool<FakeSource>, i: usize) -> u32 {
    pool.status()[i].ready
}

#[tokio::test]
async fn fills_to_target_and_refills_after_each_take() {
    let src = FakeSource::new(Duration::from_millis(1));
    let pool = Pool::new(
        Arc::clone(&src),
        vec![ProfileSpec::new("p", 1, 256, 2)],
        10_000,
        1,
    );
    let run = tokio::spawn(Arc::clone(&pool).run());
    until("2 ready", || ready(&pool, 0) == 2).await;
    assert_eq!(src.made.load(Ordering::SeqCst), 2);
    let lease = pool.take("p").unwrap();
    assert_eq!(pool.status()[0].leased, 1);
    // Half the pool is still ready: the refill waits for the client.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(ready(&pool, 0), 1);
    assert_eq!(src.alive(), 2);
    lease.destroy().await;
    assert_eq!(src.alive(), 1, "a used VM is destroyed, not returned");
    until("refilled", || ready(&pool, 0) == 2).await;
    // Below half: the refill starts at once, clients or not.
    let a = pool.take("p").unwrap();
    let b = pool.take("p").unwrap();
    until("refilled up to half under load", || ready(&pool, 0) == 1).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(ready(&pool, 0), 1);
    assert_eq!(src.alive(), 3);
    drop((a, b));
    until("destroyed and refilled", || {
        src.alive() == 2 && ready(&pool, 0) == 2
    })
    .await;
    until("released", || pool.status()[0].leased == 0).await;
    assert_eq!(pool.status()[0].handed_out, 3);
    assert_eq!(ready(&pool, 0), 2);
    assert_eq!(
        pool.take("nope").unwrap_err(),
        NoVm::UnknownProfile("nope".into())
    );
    pool.shutdown().await;
    run.await.unwrap();
    assert_eq!(src.alive(), 0, "shutdown destroys the ready VMs");
    assert_eq!(pool.take("p").unwrap_err(), NoVm::ShuttingDown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_takers_never_get_one_vm_twice() {
    let src = FakeSource::new(Duration::from_micros(200));
    let pool = Pool::new(
        Arc::clone(&src),
        vec![ProfileSpec::new("p", 1, 64, 4)],
        10_000,
        2,
    );
    let run = tokio::spawn(Arc::clone(&pool).run());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (pool, seen) = (Arc::clone(&pool), Arc::clone(&seen));
        tasks.push(tokio::spawn(async move {
            let mut got = 0;
            while got < 20 {
                match pool.take("p") {
                    Ok(mut lease) => {
                        let serial = lease.vm().unwrap().serial;
                        seen.lock().unwrap().push(serial);
                        got += 1;
                        // Half destroyed explicitly, half by drop.
                        if serial % 2 == 0 {
                            lease.destroy().await;
                        }
                    }
                    Err(NoVm::Empty(_)) => tokio::task::yield_now().await,
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    let unique: HashSet<u64> = seen.iter().copied().collect();
    assert_eq!(seen.len(), 320);
    assert_eq!(unique.len(), seen.len(), "a VM was handed out twice");
    until("leases released", || pool.status()[0].leased == 0).await;
    pool.shutdown().await;
    run.await.unwrap();
    until("all destroyed", || src.alive() == 0 && pool.filling() == 0).await;
    assert_eq!(pool.status()[0].handed_out, 320);
}

#[tokio::test]
async fn the_memory_budget_bounds_ready_filling_and_leased_vms() {
    let src = FakeSource::new(Duration::from_millis(1));
    // Room for 3 VMs of 256 MiB over two profiles that want 2 each.
    let pool = Pool::new(
        Arc::clone(&src),
        vec![
            ProfileSpec::new("a", 1, 256, 2),
            ProfileSpec::new("b", 1, 256, 2),
        ],
        800,
        4,
    );
    let run = tokio::spawn(Arc::clone(&pool).run());
    until("3 ready", || ready(&pool, 0) + ready(&pool, 1) == 3).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(ready(&pool, 0) + ready(&pool, 1), 3, "over the budget");
    assert_eq!(pool.used_mib(), 768);
    // A handed-out VM still counts: no refill until it is destroyed.
    let name = if ready(&pool, 0) > 0 { "a" } else { "b" };
    let lease = pool.take(name).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(ready(&pool, 0) + ready(&pool, 1), 2);
    assert_eq!(pool.used_mib(), 768);
    drop(lease);
    until("refilled after the destroy", || {
        ready(&pool, 0) + ready(&pool, 1) == 3
    })
    .await;
    assert!(pool.used_mib() <= 800);
    pool.shutdown().await;
    run.await.unwrap();
    assert_eq!(src.alive(), 0);
}

#[tokio::test]
async fn failed_restores_back_off_are_reported_and_recover() {
    let src = FakeSource::new(Duration::ZERO);
    src.fail.lock().unwrap().extend([0, 1]);
    let pool = Pool::new(
        Arc::clone(&src),
        vec![ProfileSpec::new("p", 1, 256, 1)],
        10_000,
        1,
    );
    let run = tokio::spawn(Arc::clone(&pool).run());
    until("recovered", || ready(&pool, 0) == 1).await;
    let st = &pool.status()[0];
    assert_eq!(st.failures, 2);
    assert!(
        st.last_error
            .as_deref()
            .unwrap()
            .contains("injected failure of restore 1"),
        "{st:?}"
    );
    assert_eq!(pool.take("p").unwrap().vm().unwrap().serial, 2);
    pool.shutdown().await;
    run.await.unwrap();
}

#[tokio::test]
async fn a_restore_that_ends_after_shutdown_is_destroyed() {
    let src = FakeSource::new(Duration::from_millis(50));
    let pool = Pool::new(
        Arc::clone(&src),
        vec![ProfileSpec::new("p", 1, 256, 1)],
        10_000,
        1,
    );
    let run = tokio::spawn(Arc::clone(&pool).run());
    until("a restore running", || pool.filling() == 1).await;
    pool.shutdown().await;
    run.await.unwrap();
    until("the late VM destroyed", || {
        pool.filling() == 0 && src.made.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(src.alive(), 0);
    assert_eq!(ready(&pool, 0), 0);
}
