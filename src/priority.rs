//! Which of saltpipe's threads the kernel runs first when the cores are
//! contended.
//!
//! On a master the cores are busy during a burst: the master's publisher,
//! its workers, saltpipe's bus reader, its queue writer and its workers all
//! want one. They are not equal. A reader or queue writer that falls behind
//! drops events (the bus is never stalled), a worker that falls behind only
//! lags (the durable queue holds the backlog). So in `run` the workers'
//! threads run ten nice steps lower ([`lower_priority`]); the listener's
//! keep the priority saltpipe was started with.
//!
//! Tried and left out (docs/BENCHMARKS.md): asking the kernel for a short
//! scheduler slice for the listener's threads (`sched_setattr`, so that
//! they preempt a task at the same nice value as soon as they wake). In a
//! 10,000-minion highstate through a real master on two cores, four runs
//! each, alternated, the listener's threads waited 3.3-4.6 s for a CPU over
//! a run instead of 4.7-5.3 s, and dropped events in three runs of four
//! (93-262 events) instead of two (45 and 246).

/// How much lower than the listener's the workers' threads run in `run`
/// (`nice` steps). At +10 a thread gets about a ninth of the CPU of a
/// normal one while both want it; when nothing else wants the core the
/// workers run at full speed. A priority nudge is not enough: the
/// conversion alone at +5 still let the queue writer starve
/// (docs/BENCHMARKS.md), since the SQL writes and the queue reads stayed at 0.
pub const WORKER_NICE: i32 = 10;

/// What the main runtime's threads run in `run` (`on_thread_start`): a
/// function that sets the calling thread's nice value to the caller's
/// (the main thread's, read now) plus [`WORKER_NICE`]. Set, not added:
/// the runtime's blocking threads are started by its other threads, and
/// threads inherit their creator's value. On Linux the nice value belongs
/// to the thread; elsewhere this does nothing, since it would lower the
/// whole process, listener included. A failure (never expected: lowering
/// needs no privilege) only leaves the thread as it was.
pub fn lower_priority() -> impl Fn() + Send + Sync + 'static {
    #[cfg(target_os = "linux")]
    {
        let target = thread_nice().saturating_add(WORKER_NICE).min(19);
        move || {
            // SAFETY: setpriority takes plain integers and touches only the
            // calling thread's (who = 0) scheduling attributes.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, target) } != 0 {
                tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower a worker thread's priority");
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        || {}
    }
}

/// The calling thread's nice value (0 if it cannot be read).
#[cfg(target_os = "linux")]
fn thread_nice() -> i32 {
    // SAFETY: getpriority takes plain integers and reads only the calling
    // thread's (who = 0) attributes. It may return -1 as a value, so errno
    // tells failure apart.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, 0);
        if n == -1 && *libc::__errno_location() != 0 {
            0
        } else {
            n
        }
    }
}
