use super::*;
use proptest::prelude::*;
use std::sync::atomic::{AtomicU32, Ordering};

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn no_jitter() -> RetryPolicy {
    RetryPolicy::new().with_jitter(0.0)
}

#[test]
fn default_backoff_is_1_2_4_capped_at_32() {
    let p = RetryPolicy::new();
    let secs: Vec<u64> = (0..8).map(|n| p.base_delay(n).as_secs()).collect();
    assert_eq!(secs, [1, 2, 4, 8, 16, 32, 32, 32]);
    assert_eq!(p.max_retries, 3);
    assert_eq!(p.base_delay(u32::MAX), Duration::from_secs(32));
}

#[test]
fn jitter_only_shortens() {
    let p = RetryPolicy::new();
    assert_eq!(p.backoff_delay(0, 0.0), Duration::from_secs(1));
    assert_eq!(p.backoff_delay(0, 1.0), Duration::from_millis(750));
    assert_eq!(p.backoff_delay(1, 0.5), Duration::from_millis(1750));
    assert_eq!(p.backoff_delay(1, f64::NAN), Duration::from_secs(2));
}

#[test]
fn method_safety() {
    for m in [
        "ping",
        "initialize",
        "tools/list",
        "resources/read",
        "prompts/get",
        "server/discover",
    ] {
        assert_eq!(Safety::of_method(m), Safety::Safe, "{m}");
    }
    for m in ["tools/call", "sampling/createMessage", "x/unknown", ""] {
        assert_eq!(Safety::of_method(m), Safety::Unsafe, "{m}");
    }
}

#[test]
fn retry_after_parsing() {
    assert_eq!(
        RetryAfter::parse(" 7 "),
        Some(RetryAfter::Delay(Duration::from_secs(7)))
    );
    assert_eq!(
        RetryAfter::parse("99999999999999999999999"),
        Some(RetryAfter::Delay(Duration::from_secs(u64::MAX)))
    );
    let at = RetryAfter::parse("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
    assert_eq!(
        at,
        RetryAfter::At(SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777))
    );
    assert_eq!(at.delay_from(now()), Duration::ZERO);
    let future = httpdate::fmt_http_date(now() + Duration::from_secs(30));
    assert_eq!(
        RetryAfter::parse(&future).unwrap().delay_from(now()),
        Duration::from_secs(30)
    );
    for bad in ["", "-1", "1.5", "soon", "Sun, 99 Nov 1994"] {
        assert_eq!(RetryAfter::parse(bad), None, "{bad}");
    }
}

#[test]
fn status_classification() {
    assert_eq!(Failure::from_status(200, None), None);
    assert_eq!(Failure::from_status(302, None), None);
    for s in [408, 425, 429, 503] {
        assert!(matches!(
            Failure::from_status(s, None),
            Some(Failure::NotProcessed { .. })
        ));
    }
    for s in [502, 504] {
        assert_eq!(
            Failure::from_status(s, None),
            Some(Failure::MaybeProcessed { status: s })
        );
    }
    for s in [400, 401, 403, 404, 500] {
        assert_eq!(Failure::from_status(s, None), Some(Failure::Permanent));
    }
}

fn decide(req: &str, f: Failure, attempts: u32) -> Decision {
    classify(
        &no_jitter(),
        &RequestKind::method(req),
        &f,
        attempts,
        Duration::ZERO,
        now(),
        0.0,
    )
}

#[test]
fn classification_table() {
    let retry1 = Decision::RetryAfter(Duration::from_secs(1));
    // Never sent or not processed: every request retries.
    for req in ["tools/call", "ping"] {
        assert_eq!(decide(req, Failure::NotSent, 1), retry1);
        assert_eq!(decide(req, Failure::Reset(Phase::BeforeSend), 1), retry1);
        assert_eq!(decide(req, Failure::Timeout(Phase::BeforeSend), 1), retry1);
        let asked = Some(RetryAfter::Delay(Duration::from_secs(1)));
        assert_eq!(
            decide(req, Failure::from_status(503, asked).unwrap(), 1),
            retry1
        );
        assert_eq!(
            decide(req, Failure::from_status(429, asked).unwrap(), 1),
            retry1
        );
        assert_eq!(
            decide(req, Failure::Permanent, 1),
            Decision::GiveUp(GiveUp::Permanent)
        );
    }
    // Not processed without an explicit invitation (no Retry-After, or 408/425): safe
    // requests retry, unsafe ones surface the answer (a proxy's 503 may hide an execution).
    for s in [408, 425, 429, 503] {
        let f = Failure::from_status(s, None).unwrap();
        assert_eq!(decide("ping", f.clone(), 1), retry1, "{s}");
        assert_eq!(
            decide("tools/call", f, 1),
            Decision::GiveUp(GiveUp::NotInvited),
            "{s}"
        );
    }
    for s in [408, 425] {
        let f = Failure::from_status(s, Some(RetryAfter::Delay(Duration::from_secs(1)))).unwrap();
        assert_eq!(
            decide("tools/call", f, 1),
            Decision::GiveUp(GiveUp::NotInvited),
            "{s}"
        );
    }
    // May have been sent: only safe requests.
    for f in [
        Failure::Reset(Phase::MaybeSent),
        Failure::Timeout(Phase::MaybeSent),
        Failure::MaybeProcessed { status: 502 },
    ] {
        assert_eq!(decide("ping", f.clone(), 1), retry1);
        assert_eq!(
            decide("tools/call", f, 1),
            Decision::GiveUp(GiveUp::NotRepeatable)
        );
    }
    // Attempts 1..=3 retry with 1, 2, 4 s; the 4th failure gives up.
    assert_eq!(
        decide("ping", Failure::NotSent, 3),
        Decision::RetryAfter(Duration::from_secs(4))
    );
    assert_eq!(
        decide("ping", Failure::NotSent, 4),
        Decision::GiveUp(GiveUp::Exhausted { attempts: 4 })
    );
}

#[test]
fn retry_after_is_honoured_and_bounded() {
    let req = RequestKind::method("tools/call");
    let f = |secs| Failure::NotProcessed {
        status: 503,
        retry_after: Some(RetryAfter::Delay(Duration::from_secs(secs))),
    };
    let p = no_jitter();
    let d = classify(&p, &req, &f(10), 1, Duration::ZERO, now(), 0.0);
    assert_eq!(d, Decision::RetryAfter(Duration::from_secs(10)));
    // Shorter than the backoff: backoff wins.
    let d = classify(&p, &req, &f(0), 3, Duration::ZERO, now(), 0.0);
    assert_eq!(d, Decision::RetryAfter(Duration::from_secs(4)));
    let d = classify(&p, &req, &f(3600), 1, Duration::ZERO, now(), 0.0);
    assert_eq!(
        d,
        Decision::GiveUp(GiveUp::RetryAfterTooLong {
            wait: Duration::from_secs(3600),
            limit: Duration::from_secs(120)
        })
    );
    // HTTP-date form.
    let at = Failure::NotProcessed {
        status: 429,
        retry_after: Some(RetryAfter::At(now() + Duration::from_secs(20))),
    };
    let d = classify(&p, &req, &at, 1, Duration::ZERO, now(), 0.0);
    assert_eq!(d, Decision::RetryAfter(Duration::from_secs(20)));
}

#[test]
fn deadline_stops_retries_that_would_overrun() {
    let p = no_jitter().with_deadline(Some(Duration::from_secs(5)));
    let req = RequestKind::method("ping");
    let d = classify(
        &p,
        &req,
        &Failure::NotSent,
        2,
        Duration::from_secs(2),
        now(),
        0.0,
    );
    assert_eq!(d, Decision::RetryAfter(Duration::from_secs(2)));
    let d = classify(
        &p,
        &req,
        &Failure::NotSent,
        2,
        Duration::from_secs(3),
        now(),
        0.0,
    );
    assert_eq!(
        d,
        Decision::GiveUp(GiveUp::Deadline {
            budget: Duration::from_secs(5)
        })
    );
}

#[derive(Debug, Clone, PartialEq)]
struct TestErr(Failure);
impl fmt::Display for TestErr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl std::error::Error for TestErr {}
impl Classify for TestErr {
    fn failure(&self) -> Failure {
        self.0.clone()
    }
}

/// Runs the driver with attempts that fail with `script[i]` (then succeed), on a manual clock.
fn drive(
    policy: &RetryPolicy,
    method: &str,
    script: Vec<Option<Failure>>,
) -> (Result<u32, RetryError<TestErr>>, u32, ManualClock) {
    let clock = ManualClock::new();
    let calls = AtomicU32::new(0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let res = rt.block_on(retry(
        policy,
        &RequestKind::method(method),
        &clock,
        |a: Attempt| {
            let i = calls.fetch_add(1, Ordering::SeqCst);
            assert_eq!(a.number, i + 1);
            let step = script.get(i as usize).cloned().flatten();
            async move {
                match step {
                    Some(Failure::Timeout(Phase::MaybeSent)) if a.budget.is_some() => {
                        // Hang: the driver's own timeout fires.
                        std::future::pending::<()>().await;
                        Ok(0)
                    }
                    Some(f) => Err(TestErr(f)),
                    None => Ok(a.number),
                }
            }
        },
    ));
    (res, calls.load(Ordering::SeqCst), clock)
}

#[test]
fn driver_retries_until_success_with_backoff() {
    let (res, calls, clock) = drive(
        &no_jitter(),
        "tools/call",
        vec![Some(Failure::NotSent), Some(Failure::NotSent), None],
    );
    assert_eq!(res.unwrap(), 3);
    assert_eq!(calls, 3);
    assert_eq!(
        clock.sleeps(),
        [Duration::from_secs(1), Duration::from_secs(2)]
    );
}

#[test]
fn driver_never_repeats_unsafe_after_send() {
    let (res, calls, clock) = drive(
        &no_jitter(),
        "tools/call",
        vec![Some(Failure::Reset(Phase::MaybeSent)), None],
    );
    let err = res.unwrap_err();
    assert_eq!(
        err.to_string(),
        "tools/call may have reached the server; not retried"
    );
    assert_eq!(
        std::error::Error::source(&err).unwrap().to_string(),
        "connection reset after sending"
    );
    assert_eq!(calls, 1);
    assert!(clock.sleeps().is_empty());
}

#[test]
fn driver_gives_up_after_three_retries() {
    let (res, calls, clock) = drive(&no_jitter(), "ping", vec![Some(Failure::NotSent); 10]);
    let err = res.unwrap_err();
    assert_eq!(err.to_string(), "ping failed 4 times; giving up");
    assert!(err.last_error().is_some());
    assert_eq!(calls, 4);
    assert_eq!(clock.elapsed(), Duration::from_secs(7));
}

#[test]
fn driver_permanent_failure_is_returned_as_is() {
    let (res, calls, _) = drive(&no_jitter(), "ping", vec![Some(Failure::Permanent)]);
    assert!(matches!(
        res,
        Err(RetryError::Failed(TestErr(Failure::Permanent)))
    ));
    assert_eq!(calls, 1);
    // A policy without retries returns the first error unwrapped too.
    let (res, calls, _) = drive(
        &RetryPolicy::no_retries(),
        "ping",
        vec![Some(Failure::NotSent)],
    );
    assert!(matches!(res, Err(RetryError::Failed(_))));
    assert_eq!(calls, 1);
}

#[test]
fn driver_attempt_timeout_retries_safe_only() {
    let p = no_jitter().with_attempt_timeout(Some(Duration::from_secs(10)));
    let hang = Some(Failure::Timeout(Phase::MaybeSent));
    let (res, calls, clock) = drive(&p, "tools/list", vec![hang.clone(), None]);
    assert_eq!(res.unwrap(), 2);
    assert_eq!(calls, 2);
    assert_eq!(clock.elapsed(), Duration::from_secs(11));

    let (res, calls, _) = drive(&p, "tools/call", vec![hang.clone(), None]);
    assert_eq!(
        res.unwrap_err().to_string(),
        "tools/call timed out after 10 s and may have reached the server; not retried"
    );
    assert_eq!(calls, 1);

    let (res, calls, _) = drive(&p, "ping", vec![hang; 10]);
    assert_eq!(res.unwrap_err().to_string(), "ping timed out after 10 s");
    assert_eq!(calls, 4);
}

#[test]
fn driver_deadline_bounds_attempts_and_sleeps() {
    let p = no_jitter()
        .with_attempt_timeout(Some(Duration::from_secs(10)))
        .with_deadline(Some(Duration::from_secs(4)));
    let (res, calls, clock) = drive(
        &p,
        "ping",
        vec![
            Some(Failure::NotSent),
            Some(Failure::Timeout(Phase::MaybeSent)),
        ],
    );
    let err = res.unwrap_err();
    assert_eq!(
        err.to_string(),
        "ping did not complete within its 4 s; the last attempt may have reached the server"
    );
    assert_eq!(calls, 2);
    // 1 s backoff, then the second attempt gets the 3 s left.
    assert_eq!(
        clock.sleeps(),
        [Duration::from_secs(1), Duration::from_secs(3)]
    );
    assert_eq!(clock.elapsed(), Duration::from_secs(4));

    let p = no_jitter().with_deadline(Some(Duration::from_millis(2500)));
    let (res, calls, clock) = drive(&p, "ping", vec![Some(Failure::NotSent); 5]);
    assert_eq!(
        res.unwrap_err().to_string(),
        "ping did not succeed within its 2.500 s"
    );
    assert_eq!(calls, 2);
    assert!(clock.elapsed() < Duration::from_millis(2500));
}

#[test]
fn driver_retry_after_too_long() {
    let f = Failure::NotProcessed {
        status: 503,
        retry_after: Some(RetryAfter::Delay(Duration::from_secs(600))),
    };
    let (res, calls, _) = drive(&no_jitter(), "tools/call", vec![Some(f)]);
    assert_eq!(
        res.unwrap_err().to_string(),
        "tools/call: the server asked to retry in 600 s, more than the 120 s limit"
    );
    assert_eq!(calls, 1);
}

#[test]
fn tokio_clock_sleeps_for_real() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let c = TokioClock;
    let t0 = c.now();
    rt.block_on(c.sleep(Duration::from_millis(20)));
    assert!(c.now() - t0 >= Duration::from_millis(20));
    assert!(c.system_now() > SystemTime::UNIX_EPOCH);
}

fn any_failure() -> impl Strategy<Value = Failure> {
    let phase = prop_oneof![Just(Phase::BeforeSend), Just(Phase::MaybeSent)];
    prop_oneof![
        Just(Failure::NotSent),
        phase.clone().prop_map(Failure::Timeout),
        phase.prop_map(Failure::Reset),
        (400u16..600, proptest::option::of(0u64..400)).prop_map(|(s, ra)| Failure::from_status(
            s,
            ra.map(|x| RetryAfter::Delay(Duration::from_secs(x)))
        )
        .unwrap_or(Failure::Permanent)),
        Just(Failure::Permanent),
    ]
}

fn any_policy() -> impl Strategy<Value = RetryPolicy> {
    (
        1u64..5000,
        1u32..5,
        1u64..100_000,
        0u32..8,
        0.0f64..=0.5,
        proptest::option::of(1u64..200_000),
    )
        .prop_map(|(init, mult, cap, retries, jitter, deadline)| {
            RetryPolicy::new()
                .with_backoff(
                    Duration::from_millis(init),
                    mult,
                    Duration::from_millis(cap),
                )
                .with_max_retries(retries)
                .with_jitter(jitter)
                .with_deadline(deadline.map(Duration::from_millis))
        })
}

proptest! {
    #[test]
    fn delays_are_bounded_and_monotone_below_cap(p in any_policy(), units in proptest::collection::vec(0.0f64..1.0, 12)) {
        let mut prev = Duration::ZERO;
        for (n, u) in units.iter().enumerate() {
            let n = n as u32;
            let base = p.base_delay(n);
            let d = p.backoff_delay(n, *u);
            prop_assert!(d <= base && base <= p.max_delay);
            prop_assert!(d >= base.mul_f64(1.0 - p.jitter) - Duration::from_nanos(1));
            if n > 0 {
                prop_assert!(base >= p.base_delay(n - 1));
                if p.multiplier >= 2 && p.base_delay(n) < p.max_delay {
                    prop_assert!(d >= prev, "retry {n}: {d:?} < {prev:?}");
                }
            }
            prev = d;
        }
    }

    #[test]
    fn decisions_respect_safety_cap_and_deadline(
        p in any_policy(),
        f in any_failure(),
        unsafe_req in any::<bool>(),
        attempts in 1u32..10,
        elapsed_ms in 0u64..200_000,
        unit in 0.0f64..1.0,
    ) {
        let req = RequestKind::new("r", if unsafe_req { Safety::Unsafe } else { Safety::Safe });
        let elapsed = Duration::from_millis(elapsed_ms);
        match classify(&p, &req, &f, attempts, elapsed, now(), unit) {
            Decision::RetryAfter(d) => {
                prop_assert!(!(unsafe_req && f.may_have_taken_effect()), "unsafe retried after {f:?}");
                prop_assert!(!unsafe_req || f.invites_retry(), "unsafe retried uninvited after {f:?}");
                prop_assert!(f != Failure::Permanent);
                prop_assert!(attempts <= p.max_retries);
                let ra_limit = p.max_retry_after.max(p.max_delay);
                prop_assert!(d <= ra_limit);
                if let Some(budget) = p.deadline {
                    prop_assert!(elapsed + d < budget);
                }
            }
            Decision::GiveUp(_) => {}
        }
    }
}

proptest! {
    #[test]
    fn retry_after_round_trips_and_never_panics(secs in 0u64..10_000_000_000, junk in ".{0,40}", date_secs in 0u64..4_000_000_000) {
        prop_assert_eq!(RetryAfter::parse(&secs.to_string()), Some(RetryAfter::Delay(Duration::from_secs(secs))));
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(date_secs);
        prop_assert_eq!(RetryAfter::parse(&httpdate::fmt_http_date(at)), Some(RetryAfter::At(at)));
        if let Some(ra) = RetryAfter::parse(&junk) {
            let _ = ra.delay_from(now());
        }
    }
}
