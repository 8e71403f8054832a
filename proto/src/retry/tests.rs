use std::cell::RefCell;
use std::collections::VecDeque;

use super::*;
use crate::status::with_detail;
use crate::v1::error_detail::{Kind, Locked, NotApplied, NotLeader, SlotMoving, WrongShard};

fn not_leader(leader_addr: &str) -> Status {
    with_detail(
        Code::Unavailable,
        "not leader",
        Kind::NotLeader(NotLeader {
            leader_id: 2,
            leader_addr: leader_addr.into(),
        }),
    )
}

const ALL: [Effect; 4] = [
    Effect::Read,
    Effect::StaleRead,
    Effect::Write,
    Effect::IdempotentWrite,
];

#[test]
fn refusals_are_classified_alike_for_every_effect() {
    for effect in ALL {
        assert_eq!(
            classify(&not_leader("http://127.0.0.1:7002/"), effect),
            Action::Redirect("127.0.0.1:7002".into())
        );
        // A hint we cannot use is as good as none.
        assert_eq!(classify(&not_leader("https://x:1"), effect), Action::Rotate);
        assert_eq!(classify(&not_leader(""), effect), Action::Rotate);
        let not_applied = with_detail(Code::Unavailable, "full", Kind::NotApplied(NotApplied {}));
        assert_eq!(classify(&not_applied, effect), Action::Rotate);
        let moving = with_detail(
            Code::Unavailable,
            "fenced",
            Kind::SlotMoving(SlotMoving::default()),
        );
        assert_eq!(classify(&moving, effect), Action::Hold);
        let wrong = with_detail(
            Code::FailedPrecondition,
            "x",
            Kind::WrongShard(WrongShard { map_version: 7 }),
        );
        assert_eq!(
            classify(&wrong, effect),
            Action::Refresh { node_version: 7 }
        );
        // The same detail under the wrong code is not trusted, nor retried.
        let wrong = with_detail(
            Code::Unavailable,
            "x",
            Kind::WrongShard(WrongShard { map_version: 3 }),
        );
        assert_eq!(classify(&wrong, effect), Action::Fail);
        let locked = with_detail(Code::Aborted, "x", Kind::Locked(Locked::default()));
        assert_eq!(classify(&locked, effect), Action::Locked(Locked::default()));
        assert_eq!(classify(&Status::aborted("cas"), effect), Action::Fail);
        assert_eq!(
            classify(&Status::failed_precondition("other"), effect),
            Action::Fail
        );
        for code in [
            Code::InvalidArgument,
            Code::DeadlineExceeded,
            Code::DataLoss,
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
        ] {
            let action = classify(&Status::new(code, "x"), effect);
            assert_eq!(action, Action::Fail, "{code:?}");
            assert!(!action.retries());
        }
    }
}

#[test]
fn writes_retry_only_what_was_certainly_not_applied() {
    let plain = Status::unavailable("no leader yet");
    let junk = Status::with_details(Code::Unavailable, "x", b"\xff\xff"[..].to_vec().into());
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
    let broken = Status::from_error(Box::new(io));
    let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    let connect = Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
    for effect in [Effect::Read, Effect::StaleRead, Effect::IdempotentWrite] {
        assert_eq!(classify(&plain, effect), Action::Rotate);
        assert_eq!(classify(&junk, effect), Action::Rotate);
        assert_eq!(classify(&broken, effect), Action::Rotate);
        assert_eq!(classify(&connect, effect), Action::Rotate);
    }
    assert_eq!(classify(&plain, Effect::Write), Action::OutcomeUnknown);
    assert_eq!(classify(&junk, Effect::Write), Action::OutcomeUnknown);
    assert_eq!(classify(&broken, Effect::Write), Action::OutcomeUnknown);
    assert_eq!(classify(&connect, Effect::Write), Action::Rotate);
    assert!(!Action::OutcomeUnknown.retries());
    assert!(!Effect::Write.repeatable() && Effect::IdempotentWrite.repeatable());
}

#[test]
fn backoff_doubles_and_is_capped() {
    let b = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
    assert_eq!(b.delay(0), Duration::from_millis(20));
    assert_eq!(b.delay(1), Duration::from_millis(40));
    assert_eq!(b.delay(4), Duration::from_millis(320));
    assert_eq!(b.delay(5), b.max);
    assert_eq!(b.delay(u32::MAX), b.max);
    let mut prev = Duration::ZERO;
    for retry in 0..100 {
        let d = b.delay(retry);
        assert!(d >= prev && d <= b.max && d >= b.first);
        prev = d;
    }
    assert_eq!(b.worst(3), Duration::from_millis(140));
}

#[test]
fn the_cursor_follows_hints_and_rotates() {
    let mut c = LeaderCursor::new(vec!["a:1".into(), "b:1".into(), "c:1".into()]);
    assert_eq!(c.target(), "a:1");
    c.redirect("c:1".into());
    assert_eq!(c.target(), "c:1");
    assert_eq!(c.leader.as_deref(), Some("c:1"));
    // The leader failed: forget it and move past it in the list.
    c.rotate("c:1");
    assert_eq!(c.leader, None);
    assert_eq!(c.target(), "a:1");
    c.rotate("a:1");
    assert_eq!(c.target(), "b:1");
    // A failure on an address other than the remembered leader leaves the leader alone.
    c.redirect("a:1".into());
    c.rotate("b:1");
    assert_eq!(c.target(), "a:1");
    // A failed hint outside the list steps on from where the list was.
    c.redirect("z:9".into());
    c.rotate("z:9");
    assert_eq!(c.target(), "c:1");
    c.learn("d:1".into());
    c.learn("a:1".into());
    assert_eq!(c.addrs, ["a:1", "b:1", "c:1", "d:1"]);
    c.succeeded("d:1");
    assert_eq!(c.target(), "d:1");
}

/// A scripted replica set: each attempt takes the next answer (`None`: never answers) and is
/// logged with the time it started.
struct Script {
    answers: RefCell<VecDeque<Option<Result<u32, Status>>>>,
    log: RefCell<Vec<(String, Duration)>>,
    started: Instant,
}

impl Script {
    fn new(answers: Vec<Option<Result<u32, Status>>>) -> Script {
        Script {
            answers: RefCell::new(answers.into()),
            log: RefCell::new(Vec::new()),
            started: Instant::now(),
        }
    }

    fn attempt(
        &self,
        addr: String,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<u32, Status>>>> {
        self.log.borrow_mut().push((addr, self.started.elapsed()));
        let answer = self
            .answers
            .borrow_mut()
            .pop_front()
            .expect("script ran out");
        Box::pin(async move {
            match answer {
                Some(answer) => answer,
                None => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    unreachable!("the walk bounds every attempt")
                }
            }
        })
    }

    fn addrs(&self) -> Vec<String> {
        self.log.borrow().iter().map(|(a, _)| a.clone()).collect()
    }

    fn times_ms(&self) -> Vec<u128> {
        self.log
            .borrow()
            .iter()
            .map(|(_, t)| t.as_millis())
            .collect()
    }
}

const BACKOFF: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(40));

fn cursor() -> Mutex<LeaderCursor> {
    Mutex::new(LeaderCursor::new(vec!["a:1".into(), "b:1".into()]))
}

fn walk(effect: Effect, attempts_max: u32) -> Walk {
    Walk::new(
        effect,
        attempts_max,
        Instant::now() + Duration::from_secs(10),
        BACKOFF,
    )
}

#[tokio::test(start_paused = true)]
async fn the_first_hint_is_followed_at_once_later_ones_back_off() {
    let script = Script::new(vec![
        Some(Err(not_leader("c:1"))),
        Some(Err(not_leader("a:1"))),
        Some(Err(Status::unavailable("electing"))),
        Some(Ok(7)),
    ]);
    let c = cursor();
    let got = follow_leader(&c, &walk(Effect::Read, 10), |a, _| script.attempt(a)).await;
    assert_eq!(got.unwrap(), 7);
    assert_eq!(script.addrs(), ["a:1", "c:1", "a:1", "b:1"]);
    // 0 ms hint, 20 ms (second backoff step) hint, 40 ms rotation.
    assert_eq!(script.times_ms(), [0, 0, 20, 60]);
    assert_eq!(c.lock().unwrap().leader.as_deref(), Some("b:1"));
}

#[tokio::test(start_paused = true)]
async fn a_write_that_may_have_applied_is_not_sent_again() {
    let script = Script::new(vec![Some(Err(Status::unavailable("lost leadership")))]);
    let c = cursor();
    let err = follow_leader(&c, &walk(Effect::Write, 10), |a, _| script.attempt(a))
        .await
        .unwrap_err();
    assert!(matches!(
        err.why,
        Why::Refused {
            action: Action::OutcomeUnknown,
            ..
        }
    ));
    assert_eq!((err.attempts, err.addr.as_str()), (1, "a:1"));
    assert_eq!(err.last_status().unwrap().message(), "lost leadership");
}

#[tokio::test(start_paused = true)]
async fn attempts_are_bounded_and_the_last_error_is_kept() {
    let script = Script::new(
        (0..3)
            .map(|i| Some(Err(Status::unavailable(format!("down {i}")))))
            .collect(),
    );
    let c = cursor();
    let err = follow_leader(&c, &walk(Effect::Read, 3), |a, _| script.attempt(a))
        .await
        .unwrap_err();
    assert!(matches!(&err.why, Why::AttemptsSpent(s) if s.message() == "down 2"));
    assert_eq!(err.attempts, 3);
    assert_eq!(script.addrs(), ["a:1", "b:1", "a:1"]);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_backoffs_and_attempts() {
    // 25 ms: the first backoff (10 ms) fits, the second (20 ms) does not.
    let mut w = walk(Effect::Read, 10);
    w.deadline = Instant::now() + Duration::from_millis(25);
    let script = Script::new(vec![
        Some(Err(Status::unavailable("1"))),
        Some(Err(Status::unavailable("2"))),
    ]);
    let err = follow_leader(&cursor(), &w, |a, _| script.attempt(a))
        .await
        .unwrap_err();
    assert!(matches!(&err.why, Why::OutOfTime(s) if s.message() == "2"));
    assert_eq!(err.attempts, 2);

    // An attempt that never answers is cut at the deadline, and not retried.
    let mut w = walk(Effect::Read, 10);
    w.deadline = Instant::now() + Duration::from_millis(300);
    let script = Script::new(vec![None]);
    let started = Instant::now();
    let err = follow_leader(&cursor(), &w, |a, _| script.attempt(a))
        .await
        .unwrap_err();
    assert!(matches!(err.why, Why::NoAnswer { bound } if bound == Duration::from_millis(300)));
    assert_eq!(started.elapsed(), Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn an_attempt_out_of_its_own_bound_is_repeated_only_when_repeatable() {
    let mut w = walk(Effect::IdempotentWrite, 10);
    w.attempt_timeout = Some(Duration::from_secs(1));
    let script = Script::new(vec![None, Some(Ok(1))]);
    let c = cursor();
    assert_eq!(
        follow_leader(&c, &w, |a, _| script.attempt(a))
            .await
            .unwrap(),
        1
    );
    assert_eq!(script.addrs(), ["a:1", "b:1"]);

    w.effect = Effect::Write;
    let script = Script::new(vec![None]);
    let err = follow_leader(&c, &w, |a, _| script.attempt(a))
        .await
        .unwrap_err();
    assert!(matches!(err.why, Why::NoAnswer { .. }));
}

#[tokio::test(start_paused = true)]
async fn holds_stay_and_refusals_end_the_walk() {
    let moving = with_detail(
        Code::Unavailable,
        "fenced",
        Kind::SlotMoving(SlotMoving::default()),
    );
    let script = Script::new(vec![
        Some(Err(moving)),
        Some(Err(Status::invalid_argument("bad key"))),
    ]);
    let err = follow_leader(&cursor(), &walk(Effect::Write, 10), |a, _| {
        script.attempt(a)
    })
    .await
    .unwrap_err();
    assert!(matches!(
        &err.why,
        Why::Refused { status, action: Action::Fail } if status.message() == "bad key"
    ));
    assert_eq!(script.addrs(), ["a:1", "a:1"]);
}

#[tokio::test(start_paused = true)]
async fn pinned_and_stale_walks_do_not_move_the_leader() {
    let mut w = walk(Effect::StaleRead, 10);
    w.pinned = true;
    let script = Script::new(vec![
        Some(Err(Status::unavailable("catching up"))),
        Some(Err(not_leader("b:1"))),
    ]);
    let c = cursor();
    let err = follow_leader(&c, &w, |a, _| script.attempt(a))
        .await
        .unwrap_err();
    assert!(matches!(
        err.why,
        Why::Refused {
            action: Action::Redirect(_),
            ..
        }
    ));
    assert_eq!(script.addrs(), ["a:1", "a:1"]);
    assert_eq!(
        *c.lock().unwrap(),
        LeaderCursor::new(vec!["a:1".into(), "b:1".into()])
    );

    // A stale read served by a replica says nothing about who leads.
    let script = Script::new(vec![Some(Ok(3))]);
    let w = walk(Effect::StaleRead, 10);
    assert_eq!(
        follow_leader(&c, &w, |a, _| script.attempt(a))
            .await
            .unwrap(),
        3
    );
    assert_eq!(c.lock().unwrap().leader, None);
}

#[tokio::test(start_paused = true)]
async fn a_walk_whose_deadline_passed_makes_no_attempt() {
    let mut w = walk(Effect::Read, 10);
    w.deadline = Instant::now();
    let script = Script::new(vec![]);
    let err = follow_leader(&cursor(), &w, |a, _| script.attempt(a))
        .await
        .unwrap_err();
    assert!(matches!(err.why, Why::DeadlinePassed(None)));
    assert_eq!(err.attempts, 0);
}
