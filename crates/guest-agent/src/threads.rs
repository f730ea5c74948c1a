//! Threads for the request server's jobs, kept and reused.
//!
//! Every exec needs three or four threads (stdout and stderr pumps, the waiter, stdin).
//! Starting a thread means `clone`, a stack mapping with its guard page, the signal stack
//! Rust sets up, and at its end unmapping all of that and the kernel's task teardown. Under
//! TCG the first exec after a snapshot restore pays for translating every one of those paths
//! afresh in the new QEMU process (issue 12). A finished job's thread therefore waits for the
//! next one instead of ending: the exec that the host's snapshot store runs to bring the guest
//! to rest before saving it leaves its threads idle in the snapshot, and the first exec after
//! the restore hands its jobs to them.
//!
//! Bound: at most [`Pool::max_idle`] threads wait; a thread that finishes a job while that
//! many wait ends. Busy threads are not bounded here: every job gets a thread at once (a
//! job may block for as long as its process runs, so queueing jobs could deadlock).

use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, PoisonError};

type Job = Box<dyn FnOnce() + Send>;

/// Stack size of every thread (the jobs keep their buffers on the heap).
const STACK_SIZE: usize = 256 * 1024;

/// The agent's pool.
pub static AGENT: Pool = Pool::new(16);

/// Threads that run jobs and then wait for the next one.
pub struct Pool {
    idle: Mutex<Vec<Sender<Job>>>,
    max_idle: usize,
}

impl Pool {
    /// A pool that keeps at most `max_idle` threads waiting.
    pub const fn new(max_idle: usize) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            max_idle,
        }
    }

    /// Runs `f` on an idle thread, or on a new one if none waits.
    pub fn spawn<F: FnOnce() + Send + 'static>(&'static self, f: F) -> io::Result<()> {
        let mut job: Job = Box::new(f);
        while let Some(worker) = self.lock().pop() {
            match worker.send(job) {
                Ok(()) => return Ok(()),
                // That thread is gone (it cannot be, as it only ends when not listed).
                Err(mpsc::SendError(back)) => job = back,
            }
        }
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("agent-worker".into())
            .stack_size(STACK_SIZE)
            .spawn(move || self.work(job, tx, rx))
            .map(drop)
    }

    fn work(&self, first: Job, me: Sender<Job>, jobs: Receiver<Job>) {
        first();
        loop {
            {
                let mut idle = self.lock();
                if idle.len() >= self.max_idle {
                    return;
                }
                idle.push(me.clone());
            }
            match jobs.recv() {
                Ok(job) => job(),
                Err(_) => return,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Sender<Job>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    fn pool(max_idle: usize) -> &'static Pool {
        Box::leak(Box::new(Pool::new(max_idle)))
    }

    fn wait_idle(p: &Pool, n: usize) {
        let until = Instant::now() + Duration::from_secs(10);
        while p.lock().len() != n {
            assert!(
                Instant::now() < until,
                "{} idle threads, want {n}",
                p.lock().len()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn run_on(p: &'static Pool) -> std::thread::ThreadId {
        let (tx, rx) = mpsc::channel();
        p.spawn(move || tx.send(std::thread::current().id()).unwrap())
            .unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn a_finished_thread_runs_the_next_job() {
        let p = pool(4);
        let first = run_on(p);
        wait_idle(p, 1);
        assert_eq!(run_on(p), first);
        wait_idle(p, 1);
    }

    #[test]
    fn blocking_jobs_each_get_a_thread_and_the_idle_ones_are_bounded() {
        let p = pool(2);
        let n = 5;
        let all = Arc::new(Barrier::new(n + 1));
        let (tx, rx) = mpsc::channel();
        for _ in 0..n {
            let (all, tx) = (Arc::clone(&all), tx.clone());
            // Each job waits for all the others: this only ends if they run at once.
            p.spawn(move || {
                all.wait();
                tx.send(std::thread::current().id()).unwrap();
            })
            .unwrap();
        }
        all.wait();
        let mut ids: Vec<_> = (0..n)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        ids.sort_by_key(|id| format!("{id:?}"));
        ids.dedup();
        assert_eq!(ids.len(), n);
        // Three of the five threads end; two stay for later jobs.
        wait_idle(p, 2);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(p.lock().len(), 2);
    }
}
