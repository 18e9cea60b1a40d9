//! Worker control over the bus: "there is new work" wake-ups and "cancel this job"
//! requests, on one control channel every worker subscribes to. Polling the
//! database remains as the fallback when a wake-up is missed.

use bytes::Bytes;

use crate::bus::{Bus, ControlName, Envelope, EnvelopeKind, Meta, Topic};
use crate::domain::ids::{JobId, TenantId};

/// The control channel's name.
pub const WORK_CHANNEL: &str = "work";

const WAKE: &str = "wake";
const CANCEL: &str = "cancel";

pub fn topic() -> Topic {
    Topic::Control(ControlName::parse(WORK_CHANNEL).expect("a valid channel name"))
}

/// A control message as a worker reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Wake,
    Cancel(JobId),
}

fn envelope(tenant: TenantId, job: Option<JobId>, kind: &str) -> Envelope {
    let mut e = Envelope::new(tenant, EnvelopeKind::Control, Bytes::new());
    e.job = job;
    e.meta = Meta::typed(kind).expect("a short ASCII type");
    e
}

/// Tells idle workers a job was queued.
pub async fn wake(bus: &Bus, tenant: TenantId) {
    if let Err(e) = bus
        .publish_to(&topic(), &envelope(tenant, None, WAKE))
        .await
    {
        tracing::debug!(error = %e, "worker wake-up not published; workers poll");
    }
}

/// Asks the worker running `job` to interrupt it.
pub async fn cancel(bus: &Bus, tenant: TenantId, job: JobId) {
    if let Err(e) = bus
        .publish_to(&topic(), &envelope(tenant, Some(job), CANCEL))
        .await
    {
        tracing::warn!(error = %e, %job, "cancel not published; the worker sees it at its next lease renewal");
    }
}

pub fn parse(e: &Envelope) -> Option<Control> {
    match (e.event_type(), e.job) {
        (Some(WAKE), _) => Some(Control::Wake),
        (Some(CANCEL), Some(job)) => Some(Control::Cancel(job)),
        _ => None,
    }
}
