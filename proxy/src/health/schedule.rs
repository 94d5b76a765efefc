//! When to check which target: a pure function of the targets, the budget and `now`, so it is
//! tested with made-up instants. The task in [`super`] only sleeps, starts checks and reports.
//!
//! Each target is checked every `max(interval, targets / budget)`: with more targets than fit
//! at their intervals, every interval stretches alike. Starts are also paced at the budget, so
//! a burst (many targets added at once, a timer that woke late) cannot exceed it either.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use super::Target;

/// Checks running at once at most, whatever the budget: backends that time out must not pile
/// up connections.
pub(crate) const MAX_IN_FLIGHT: usize = 512;

/// How much a late timer may catch up: starts come at most this much of the budget at once.
const CATCH_UP: Duration = Duration::from_millis(10);

/// Every target checked, each once however many services reference it.
pub(crate) struct Schedule<V> {
    /// One start per `spacing` at most: 1 / budget.
    spacing: Duration,
    slots: Vec<Option<Slot<V>>>,
    free: Vec<usize>,
    index: HashMap<Target, usize>,
    /// (due, ticket, slot); an entry whose ticket is not its slot's any more is stale.
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    next_ticket: u64,
    /// Slots added since the last [`Schedule::settle`], to be placed in time.
    fresh: Vec<usize>,
    next_start: Instant,
    in_flight: usize,
    /// The target count the far-off checks were placed for; when it halves they come nearer.
    placed_for: usize,
    rng: u64,
}

struct Slot<V> {
    target: Target,
    value: V,
    /// Services referencing the target; 0 while a check that outlived them still runs.
    refs: u32,
    ticket: u64,
    due: Instant,
    running: bool,
    started: Instant,
}

/// A check to run now.
pub(crate) struct Start<'a, V> {
    pub slot: usize,
    pub target: &'a Target,
    pub value: &'a V,
}

impl<V> Schedule<V> {
    pub(crate) fn new(checks_per_second: u32, now: Instant, seed: u64) -> Self {
        Schedule {
            spacing: Duration::from_secs(1) / checks_per_second.max(1),
            slots: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            queue: BinaryHeap::new(),
            next_ticket: 0,
            fresh: Vec::new(),
            next_start: now,
            in_flight: 0,
            placed_for: 0,
            // xorshift needs a state other than 0.
            rng: seed | 1,
        }
    }

    /// Targets checked.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// The shortest interval the budget allows with this many targets.
    pub(crate) fn floor(&self) -> Duration {
        self.spacing
            .saturating_mul(u32::try_from(self.index.len()).unwrap_or(u32::MAX))
    }

    fn interval(&self, target: &Target) -> Duration {
        Duration::from_millis(u64::from(target.interval_ms)).max(self.floor())
    }

    /// A service references `target`; true when that starts its checks.
    pub(crate) fn add(&mut self, target: &Target, value: impl FnOnce() -> V, now: Instant) -> bool {
        if let Some(slot) = self
            .index
            .get(target)
            .and_then(|&id| self.slots[id].as_mut())
        {
            slot.refs += 1;
            return false;
        }
        let slot = Slot {
            target: target.clone(),
            value: value(),
            refs: 1,
            ticket: 0,
            due: now,
            running: false,
            started: now,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id] = Some(slot);
                id
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.index.insert(target.clone(), id);
        self.fresh.push(id);
        true
    }

    /// A service stopped referencing `target`; true when nothing references it any more, so its
    /// checks stop (a check running now ends unrecorded).
    pub(crate) fn remove(&mut self, target: &Target) -> bool {
        let Some(&id) = self.index.get(target) else {
            return false;
        };
        let Some(slot) = self.slots[id].as_mut() else {
            return false;
        };
        slot.refs = slot.refs.saturating_sub(1);
        if slot.refs > 0 {
            return false;
        }
        self.index.remove(target);
        if !slot.running {
            self.slots[id] = None;
            self.free.push(id);
        }
        true
    }

    /// Forgets every reference, for a full pass that adds back what still exists and then
    /// calls [`Schedule::sweep`]: targets still referenced keep their place and their value.
    pub(crate) fn unreference_all(&mut self) {
        for slot in self.slots.iter_mut().flatten() {
            slot.refs = 0;
        }
    }

    /// Drops the targets no service references (after [`Schedule::unreference_all`]).
    pub(crate) fn sweep(&mut self) -> Vec<Target> {
        let gone: Vec<Target> = self
            .index
            .iter()
            .filter(|(_, id)| self.slots[**id].as_ref().is_some_and(|s| s.refs == 0))
            .map(|(t, _)| t.clone())
            .collect();
        for target in &gone {
            if let Some(id) = self.index.remove(target)
                && self.slots[id].as_ref().is_some_and(|s| !s.running)
            {
                self.slots[id] = None;
                self.free.push(id);
            }
        }
        gone
    }

    /// Places the targets added since the last call at random points of their interval (so
    /// targets added together spread out), and brings far-off checks nearer when the target
    /// count has halved since they were placed.
    pub(crate) fn settle(&mut self, now: Instant) {
        let count = self.index.len();
        if count * 2 <= self.placed_for {
            for id in 0..self.slots.len() {
                let Some(slot) = &self.slots[id] else {
                    continue;
                };
                let every = self.interval(&slot.target);
                if slot.refs > 0 && !slot.running && slot.due > now + every {
                    self.place(id, now, every);
                }
            }
            self.placed_for = count;
        }
        self.placed_for = self.placed_for.max(count);
        let fresh = std::mem::take(&mut self.fresh);
        for id in fresh {
            let Some(slot) = &self.slots[id] else {
                continue;
            };
            if slot.refs > 0 && !slot.running {
                let every = self.interval(&slot.target);
                self.place(id, now, every);
            }
        }
    }

    fn place(&mut self, id: usize, now: Instant, every: Duration) {
        let due = now + every.mul_f64(self.fraction());
        self.queue_at(id, due);
    }

    fn queue_at(&mut self, id: usize, due: Instant) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        if let Some(slot) = self.slots[id].as_mut() {
            slot.ticket = ticket;
            slot.due = due;
            self.queue.push(Reverse((due, ticket, id)));
        }
    }

    /// A number in [0, 1) (xorshift64*): where in its interval a new target starts.
    fn fraction(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Drops stale entries from the front of the queue.
    fn prune(&mut self) {
        while let Some(&Reverse((_, ticket, id))) = self.queue.peek() {
            let current = self.slots[id]
                .as_ref()
                .is_some_and(|s| s.ticket == ticket && s.refs > 0 && !s.running);
            if current {
                return;
            }
            self.queue.pop();
        }
    }

    /// When [`Schedule::start`] has something to start; `None`: nothing until a target is
    /// added or a running check finishes.
    pub(crate) fn next_wake(&mut self) -> Option<Instant> {
        if self.in_flight >= MAX_IN_FLIGHT {
            return None;
        }
        self.prune();
        let &Reverse((due, _, _)) = self.queue.peek()?;
        Some(due.max(self.next_start))
    }

    /// The next check due by `now`, if the budget and the concurrency bound allow one.
    pub(crate) fn start(&mut self, now: Instant) -> Option<Start<'_, V>> {
        if self.in_flight >= MAX_IN_FLIGHT || self.next_start > now {
            return None;
        }
        self.prune();
        let &Reverse((due, _, id)) = self.queue.peek()?;
        if due > now {
            return None;
        }
        self.queue.pop();
        let floor = now.checked_sub(CATCH_UP).unwrap_or(now);
        self.next_start = self.next_start.max(floor) + self.spacing;
        self.in_flight += 1;
        let slot = self.slots[id].as_mut()?;
        slot.running = true;
        slot.started = now;
        Some(Start {
            slot: id,
            target: &slot.target,
            value: &slot.value,
        })
    }

    /// A check started by [`Schedule::start`] ended: its target's next check is one interval
    /// after this one started. `None` when the target was dropped meanwhile (discard the
    /// result); otherwise the target and its value, to record the result in.
    pub(crate) fn finish(&mut self, id: usize) -> Option<(&Target, &V, u32)> {
        let slot = self.slots.get_mut(id)?.as_mut()?;
        if !slot.running {
            return None;
        }
        slot.running = false;
        self.in_flight -= 1;
        if slot.refs == 0 {
            self.slots[id] = None;
            self.free.push(id);
            return None;
        }
        let next = slot.started + self.interval(&self.slots[id].as_ref()?.target);
        self.queue_at(id, next);
        let slot = self.slots[id].as_ref()?;
        Some((&slot.target, &slot.value, slot.refs))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use portcullis_config::model::{Backend, UpstreamProtocol};

    /// Target `n` of many: a backend of its own.
    fn target(n: u16, path: &str, interval_ms: u32) -> Target {
        Target {
            backend: Backend::parse(&format!("10.0.{}.{}:80", n / 256, n % 256)).unwrap(),
            protocol: UpstreamProtocol::Http1,
            path: Some(path.into()),
            interval_ms,
            timeout_ms: interval_ms.min(2_000),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }

    /// Runs the schedule from `start` to `end`, each check taking `takes`; the start times.
    fn drive(s: &mut Schedule<()>, start: Instant, end: Instant, takes: Duration) -> Vec<Instant> {
        let mut now = start;
        let mut running: Vec<(Instant, usize)> = Vec::new();
        let mut starts = Vec::new();
        while now < end {
            while let Some(started) = s.start(now) {
                running.push((now + takes, started.slot));
                starts.push(now);
            }
            running.sort_by_key(|r| Reverse(r.0));
            let wake = s.next_wake();
            let done = running.last().map(|r| r.0);
            now = match (wake, done) {
                (Some(w), Some(d)) if d <= w => d,
                (Some(w), _) => w,
                (None, Some(d)) => d,
                (None, None) => break,
            };
            while running.last().is_some_and(|r| r.0 <= now) {
                let (_, id) = running.pop().unwrap();
                s.finish(id);
            }
        }
        starts
    }

    #[test]
    fn a_target_many_services_share_is_checked_once_per_interval() {
        let t0 = Instant::now();
        let mut s = Schedule::new(200, t0, 7);
        let shared = target(80, "/", 1_000);
        for _ in 0..50 {
            s.add(&shared, || (), t0);
        }
        s.settle(t0);
        assert_eq!(s.len(), 1);
        let starts = drive(
            &mut s,
            t0,
            t0 + Duration::from_secs(10),
            Duration::from_millis(5),
        );
        assert!((9..=11).contains(&starts.len()), "{}", starts.len());

        // Checks go on while one service is left, and stop with the last.
        for _ in 0..49 {
            assert!(!s.remove(&shared));
        }
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            drive(&mut s, t1, t1 + Duration::from_secs(3), Duration::ZERO).len(),
            3
        );
        assert!(s.remove(&shared));
        assert_eq!(s.len(), 0);
        assert!(s.next_wake().is_none());
    }

    #[test]
    fn ten_thousand_services_stay_within_the_budget() {
        let t0 = Instant::now();
        let budget = 200;
        let mut s = Schedule::new(budget, t0, 11);
        // 10,000 services of two backends each, checked every second if the budget allowed.
        for n in 0..20_000u16 {
            s.add(&target(n, "/", 1_000), || (), t0);
        }
        s.settle(t0);
        assert_eq!(s.floor(), Duration::from_secs(100));
        let seconds = 300;
        let starts = drive(
            &mut s,
            t0,
            t0 + Duration::from_secs(seconds),
            Duration::from_millis(20),
        );
        let mut per_second = vec![0u32; seconds as usize];
        for at in &starts {
            per_second[(*at - t0).as_secs() as usize] += 1;
        }
        let worst = per_second.iter().max().copied().unwrap();
        // The pacing's bound: the budget, plus what a late timer may catch up, plus one.
        assert!(
            worst <= budget + budget / 100 + 1,
            "{worst} checks in one second"
        );
        // And the budget is used, not wasted: every target is checked about every 100 s.
        let total = starts.len() as u64;
        assert!(
            total >= u64::from(budget) * seconds * 95 / 100,
            "{total} checks"
        );
    }

    #[test]
    fn intervals_come_back_when_targets_go() {
        let t0 = Instant::now();
        let mut s = Schedule::new(10, t0, 3);
        let many: Vec<Target> = (0..1_000).map(|p| target(p, "/", 1_000)).collect();
        for t in &many {
            s.add(t, || (), t0);
        }
        s.settle(t0);
        assert_eq!(s.floor(), Duration::from_secs(100));
        for t in &many[1..] {
            s.remove(t);
        }
        s.settle(t0);
        // The one left is checked within its own interval now, not 100 s out.
        let starts = drive(&mut s, t0, t0 + Duration::from_secs(5), Duration::ZERO);
        assert!(starts.len() >= 4, "{}", starts.len());
    }

    #[test]
    fn a_full_pass_keeps_what_is_still_referenced() {
        let t0 = Instant::now();
        let mut s = Schedule::new(100, t0, 5);
        let (a, b) = (target(1, "/", 1_000), target(2, "/", 1_000));
        s.add(&a, || 1, t0);
        s.add(&b, || 2, t0);
        s.settle(t0);
        s.unreference_all();
        s.add(&a, || 99, t0);
        assert_eq!(s.sweep(), vec![b.clone()]);
        assert_eq!(s.len(), 1);
        let started = drive_one(&mut s, t0 + Duration::from_secs(2));
        assert_eq!(started, Some(1), "a kept its value");
    }

    fn drive_one(s: &mut Schedule<i32>, now: Instant) -> Option<i32> {
        s.start(now).map(|started| *started.value)
    }

    #[test]
    fn a_target_dropped_while_its_check_runs_ends_unrecorded() {
        let t0 = Instant::now();
        let mut s = Schedule::new(100, t0, 9);
        let a = target(1, "/", 100);
        s.add(&a, || (), t0);
        s.settle(t0);
        let now = t0 + Duration::from_secs(1);
        let id = s.start(now).unwrap().slot;
        assert!(s.remove(&a));
        // Added again while the old check runs: a new slot, placed afresh.
        s.add(&a, || (), now);
        s.settle(now);
        assert!(s.finish(id).is_none());
        assert_eq!(s.len(), 1);
        assert!(s.start(now + Duration::from_secs(1)).is_some());
    }
}
