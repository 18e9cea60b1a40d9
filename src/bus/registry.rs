//! The pod's local subscriber registry: channel name → broadcast ring, with a
//! reference count deciding when the transport must (un)subscribe.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::broadcast;

use super::BusItem;

pub(super) struct Registry {
    /// Held only for map operations and non-blocking sends, never across an await.
    state: Mutex<State>,
    capacity: usize,
}

#[derive(Default)]
struct State {
    channels: HashMap<String, Entry>,
    /// Set when the bus has shut down: new subscriptions get a closed feed.
    closed: bool,
}

struct Entry {
    sender: broadcast::Sender<BusItem>,
    /// Live `Subscription`s of this channel on this pod.
    subscribers: usize,
}

impl Registry {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::default(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding this lock cannot leave the map half-updated
        // in a way that matters more than stopping the pod's fan-out would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a subscriber. `on_first` runs under the lock when the channel gains its
    /// first subscriber, so transport commands are queued in registry order.
    pub(super) fn join(
        &self,
        channel: &str,
        on_first: impl FnOnce(),
    ) -> broadcast::Receiver<BusItem> {
        let mut state = self.lock();
        if state.closed {
            return broadcast::channel(1).1;
        }
        if let Some(entry) = state.channels.get_mut(channel) {
            entry.subscribers += 1;
            return entry.sender.subscribe();
        }
        let (sender, receiver) = broadcast::channel(self.capacity);
        state.channels.insert(
            channel.to_owned(),
            Entry {
                sender,
                subscribers: 1,
            },
        );
        on_first();
        receiver
    }

    /// Removes a subscriber; `on_last` runs under the lock when it was the last one.
    pub(super) fn leave(&self, channel: &str, on_last: impl FnOnce()) {
        let mut state = self.lock();
        let Some(entry) = state.channels.get_mut(channel) else {
            return;
        };
        entry.subscribers -= 1;
        if entry.subscribers == 0 {
            state.channels.remove(channel);
            on_last();
        }
    }

    /// Hands `item` to every local subscriber of `channel` without waiting.
    pub(super) fn dispatch(&self, channel: &str, item: BusItem) {
        let state = self.lock();
        if let Some(entry) = state.channels.get(channel) {
            // Err only means every receiver is gone and the guard has not run yet.
            let _ = entry.sender.send(item);
        }
    }

    /// The subscribed channels, taken together with `also` under the lock so no
    /// join or leave slips between the two.
    pub(super) fn snapshot<T>(&self, also: impl FnOnce() -> T) -> (Vec<String>, T) {
        let state = self.lock();
        let channels = state.channels.keys().cloned().collect();
        (channels, also())
    }

    /// Ends every feed: subscribers see `None` once drained.
    pub(super) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.channels.clear();
    }

    pub(super) fn channel_count(&self) -> usize {
        self.lock().channels.len()
    }
}
