//! Puts a tenant's durable events back in log order before they reach the outboxes.
//!
//! Ids become visible in the log in order (appends hold the tenant's lock), but each
//! process publishes its events after its own commit, so two processes' events can
//! reach Redis in the opposite order. A client that saw the later one live and then
//! dropped would resume after it (`since`) and never get the earlier one. Each event
//! names its tenant's previous event (`prev`), so a pump sees the gap: an event whose
//! predecessor it has not passed on yet waits for it — normally a millisecond or two,
//! at most [`HOLD`]. Then the pump gives up waiting (a publisher may have died
//! between its commit and its publish, or be stalled): a resync goes first, so every
//! stream replays what it lacks from the log — the predecessor committed before its
//! successor took the tenant's lock, so the log has it — and the held events follow,
//! as duplicates the streams drop. A pump's first event has nothing to compare with
//! (its predecessor may be on the way, or long gone): it goes at once, after a
//! resync for the same reason.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::bus::{BusItem, EnvelopeKind, ResyncCause};

/// Longest an event waits for its predecessor.
pub const HOLD: Duration = Duration::from_millis(500);

#[derive(Default)]
pub struct EventOrder {
    /// The last event passed on, once one has been.
    last: Option<u64>,
    /// Events waiting for their predecessor, by that predecessor's id.
    held: BTreeMap<u64, BusItem>,
    /// When the oldest held event must go regardless.
    deadline: Option<Instant>,
}

impl EventOrder {
    /// Passes `item` on through `out` in log order, holding it if its predecessor
    /// has not been seen.
    pub fn admit(&mut self, item: BusItem, out: &mut Vec<BusItem>) {
        let (id, prev) = match &item {
            BusItem::Envelope(env) if env.envelope().kind == EnvelopeKind::Event => {
                let env = env.envelope();
                (env.id, env.prev_event_id())
            }
            BusItem::Envelope(_) => return out.push(item),
            // A gap in the bus itself: streams re-read the log; start afresh.
            BusItem::Resync(_) => {
                self.pass_held(out);
                self.last = None;
                return out.push(item);
            }
        };
        match (self.last, prev) {
            (Some(last), Some(prev)) if prev > last => {
                self.held.insert(prev, item);
                self.deadline.get_or_insert_with(|| Instant::now() + HOLD);
            }
            // Older than what already went (it waited out its hold): late, but sent.
            (Some(last), _) if id <= last => out.push(item),
            (None, Some(_)) => {
                out.push(BusItem::Resync(ResyncCause::PredecessorMissing));
                out.push(item);
                self.last = Some(id);
                self.pass_successors(out);
            }
            _ => {
                out.push(item);
                self.last = Some(id);
                self.pass_successors(out);
            }
        }
    }

    /// When the held events must go, if any are held.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The hold ran out: a resync (the missing predecessors are read from the log),
    /// then everything held, in id order.
    pub fn release(&mut self, out: &mut Vec<BusItem>) {
        if !self.held.is_empty() {
            out.push(BusItem::Resync(ResyncCause::PredecessorMissing));
        }
        self.pass_held(out);
    }

    fn pass_held(&mut self, out: &mut Vec<BusItem>) {
        for (_, item) in std::mem::take(&mut self.held) {
            if let BusItem::Envelope(env) = &item {
                let id = env.envelope().id;
                self.last = Some(self.last.map_or(id, |l| l.max(id)));
            }
            out.push(item);
        }
        self.deadline = None;
    }

    fn pass_successors(&mut self, out: &mut Vec<BusItem>) {
        while let Some(last) = self.last
            && let Some(item) = self.held.remove(&last)
        {
            if let BusItem::Envelope(env) = &item {
                self.last = Some(env.envelope().id);
            }
            out.push(item);
        }
        if self.held.is_empty() {
            self.deadline = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Envelope, SharedEnvelope, meta_keys};
    use crate::domain::ids::TenantId;

    fn event(id: u64, prev: Option<u64>) -> BusItem {
        let mut env =
            Envelope::event(TenantId::default(), None, id, "job.queued", "{}".into()).unwrap();
        if let Some(prev) = prev {
            env.meta = env.meta.with(meta_keys::PREV, &prev.to_string()).unwrap();
        }
        BusItem::Envelope(SharedEnvelope::new(env))
    }

    fn ids(items: &[BusItem]) -> Vec<u64> {
        items
            .iter()
            .map(|i| match i {
                BusItem::Envelope(e) => e.envelope().id,
                BusItem::Resync(_) => 0,
            })
            .collect()
    }

    #[test]
    fn an_event_that_overtook_its_predecessor_waits_for_it() {
        let mut order = EventOrder::default();
        let mut out = Vec::new();
        order.admit(event(10, None), &mut out);
        order.admit(event(12, Some(11)), &mut out);
        order.admit(event(13, Some(12)), &mut out);
        assert_eq!(ids(&out), [10]);
        assert!(order.deadline().is_some());
        order.admit(event(11, Some(10)), &mut out);
        assert_eq!(ids(&out), [10, 11, 12, 13]);
        assert!(
            out.iter().all(|i| matches!(i, BusItem::Envelope(_))),
            "no resync"
        );
        assert!(order.deadline().is_none());
    }

    #[test]
    fn held_events_go_in_order_when_the_hold_runs_out() {
        let mut order = EventOrder::default();
        let mut out = Vec::new();
        order.admit(event(10, None), &mut out);
        order.admit(event(14, Some(13)), &mut out);
        order.admit(event(12, Some(11)), &mut out);
        assert_eq!(ids(&out), [10]);
        order.release(&mut out);
        // 0: the resync that has streams read 11 and 13 from the log first.
        assert_eq!(ids(&out), [10, 0, 12, 14]);
        assert!(matches!(
            out[1],
            BusItem::Resync(ResyncCause::PredecessorMissing)
        ));
        // The one that never came arrives after all: late, but not dropped.
        order.admit(event(11, Some(10)), &mut out);
        assert_eq!(ids(&out), [10, 0, 12, 14, 11]);
        order.admit(event(15, Some(14)), &mut out);
        assert_eq!(ids(&out), [10, 0, 12, 14, 11, 15]);
    }

    #[test]
    fn other_envelopes_and_events_without_a_predecessor_pass_at_once() {
        let mut order = EventOrder::default();
        let mut out = Vec::new();
        order.admit(event(10, None), &mut out);
        order.admit(event(20, Some(19)), &mut out);
        let progress = Envelope::new(TenantId::default(), EnvelopeKind::Progress, "{}".into());
        order.admit(BusItem::Envelope(SharedEnvelope::new(progress)), &mut out);
        order.admit(event(30, None), &mut out);
        // 0 after 10: the progress envelope, which is not an event.
        assert_eq!(ids(&out), [10, 0, 30]);
        order.release(&mut out);
        assert_eq!(ids(&out), [10, 0, 30, 0, 20]);
        // Nothing held: nothing to resync.
        order.release(&mut out);
        assert_eq!(out.len(), 5);
    }

    #[test]
    fn a_first_event_goes_at_once_after_a_resync_for_its_unseen_predecessor() {
        let mut order = EventOrder::default();
        let mut out = Vec::new();
        order.admit(event(10, Some(9)), &mut out);
        assert_eq!(ids(&out), [0, 10]);
        assert!(matches!(
            out[0],
            BusItem::Resync(ResyncCause::PredecessorMissing)
        ));
        // From then on the feed has its baseline.
        order.admit(event(11, Some(10)), &mut out);
        assert_eq!(ids(&out), [0, 10, 11]);
    }
}
