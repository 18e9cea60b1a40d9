use super::*;
use rand::{Rng, SeedableRng};

fn sample() -> Envelope {
    Envelope {
        tenant: TenantId::new(),
        kind: EnvelopeKind::Event,
        job: Some(JobId::new()),
        id: 0x0102_0304_0506_0708,
        published_at_micros: 1_700_000_000_000_000,
        meta: Meta::typed("job.completed")
            .unwrap()
            .with(meta_keys::NODE, "10")
            .unwrap(),
        payload: Bytes::from_static(br#"{"status":"completed"}"#),
    }
}

#[test]
fn round_trips_every_kind() {
    for kind in [
        EnvelopeKind::Event,
        EnvelopeKind::Progress,
        EnvelopeKind::Preview,
        EnvelopeKind::JobStatus,
        EnvelopeKind::Control,
    ] {
        let env = Envelope { kind, ..sample() };
        assert_eq!(Envelope::decode(env.encode()).unwrap(), env);
    }
    let no_job = Envelope {
        job: None,
        meta: Meta::new(),
        payload: Bytes::new(),
        ..sample()
    };
    let frame = no_job.encode();
    assert_eq!(frame.len(), HEADER_LEN);
    assert_eq!(Envelope::decode(frame).unwrap(), no_job);
}

#[test]
fn preview_payload_is_raw_and_sliced_without_copy() {
    let image: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let env = Envelope::preview(
        TenantId::new(),
        JobId::new(),
        7,
        "3",
        "image/png",
        Bytes::from(image.clone()),
    )
    .unwrap();
    let frame = env.encode();
    // Raw bytes on the wire: the image is the frame's tail, not base64.
    assert!(frame.ends_with(&image));
    let decoded = Envelope::decode(frame.clone()).unwrap();
    assert_eq!(&decoded.payload[..], &image[..]);
    let frame_range = frame.as_ptr_range();
    assert!(
        frame_range.contains(&decoded.payload.as_ptr()),
        "payload was copied"
    );
    assert_eq!(decoded.meta.get(meta_keys::MIME), Some("image/png"));
    assert_eq!(decoded.meta.get(meta_keys::NODE), Some("3"));
    assert_eq!(decoded.id, 7);
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let frame = sample().encode();
    let meta_end = HEADER_LEN + sample().meta.encoded_len();
    for len in 0..frame.len() {
        let result = Envelope::decode(frame.slice(..len));
        // Cutting into the payload still yields a valid (shorter) envelope: the
        // payload is "the rest". Anything shorter must fail.
        if len < meta_end {
            assert!(result.is_err(), "truncated to {len} decoded: {result:?}");
        } else {
            assert!(result.is_ok(), "cut at {len}: {result:?}");
        }
    }
}

#[test]
fn rejects_bad_header_fields() {
    let frame = sample().encode().to_vec();
    let with = |i: usize, v: u8| {
        let mut f = frame.clone();
        f[i] = v;
        Envelope::decode(Bytes::from(f))
    };
    assert_eq!(with(0, 2).unwrap_err(), DecodeError::Version(2));
    assert_eq!(with(1, 0).unwrap_err(), DecodeError::Kind(0));
    assert_eq!(with(1, 9).unwrap_err(), DecodeError::Kind(9));
    assert!(matches!(with(2, 0b10), Err(DecodeError::Flags(_))));
    assert!(matches!(with(3, 1), Err(DecodeError::Flags(_))));
    // Job bytes present but flag cleared.
    assert_eq!(with(2, 0).unwrap_err(), DecodeError::StrayJob);
    // Meta length pointing past the end.
    let mut f = frame.clone();
    f[52] = 0xff;
    f[53] = 0xff;
    assert!(matches!(
        Envelope::decode(Bytes::from(f)),
        Err(DecodeError::MetaOverrun { .. })
    ));
    // A meta entry with an empty key, and one that is not UTF-8.
    let mut f = frame.clone();
    f[HEADER_LEN] = 0;
    assert!(matches!(
        Envelope::decode(Bytes::from(f)),
        Err(DecodeError::Meta(MetaError::EmptyKey))
    ));
    let mut f = frame.clone();
    f[HEADER_LEN + 1] = 0xff;
    assert!(matches!(
        Envelope::decode(Bytes::from(f)),
        Err(DecodeError::Meta(MetaError::NotUtf8))
    ));
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let valid = sample().encode();
    for _ in 0..20_000 {
        // Half pure noise, half a valid frame with a few bytes flipped.
        let frame = if rng.r#gen::<bool>() {
            let len = rng.gen_range(0..200);
            (0..len).map(|_| rng.r#gen::<u8>()).collect::<Vec<_>>()
        } else {
            let mut f = valid.to_vec();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..f.len());
                f[i] = rng.r#gen();
            }
            f
        };
        if let Ok(env) = Envelope::decode(Bytes::from(frame)) {
            // Whatever decodes must re-encode to something that decodes the same.
            assert_eq!(Envelope::decode(env.encode()).unwrap(), env);
            let _ = env.meta.iter().count();
        }
    }
}

#[test]
fn meta_limits() {
    assert_eq!(Meta::new().with("", "x").unwrap_err(), MetaError::EmptyKey);
    let long = "k".repeat(256);
    assert_eq!(
        Meta::new().with(&long, "x").unwrap_err(),
        MetaError::KeyTooLong
    );
    let huge = "v".repeat(70_000);
    assert_eq!(
        Meta::new().with("k", &huge).unwrap_err(),
        MetaError::ValueTooLong
    );
    let big = "v".repeat(40_000);
    let m = Meta::new().with("a", &big).unwrap();
    assert_eq!(m.with("b", &big).unwrap_err(), MetaError::TooLarge);
    let m = Meta::typed("job.failed")
        .unwrap()
        .with("type", "shadowed")
        .unwrap();
    assert_eq!(m.get("type"), Some("job.failed"));
    assert_eq!(m.get("missing"), None);
}

#[test]
fn renders_once_per_dialect_and_shares_bytes() {
    let shared = SharedEnvelope::new(sample());
    let mut calls = 0;
    let first = shared.rendered(Dialect::CloudWs, |env| {
        calls += 1;
        Some(Frame::text(format!("{{\"id\":{}}}", env.id)))
    });
    let again = shared.clone().rendered(Dialect::CloudWs, |_| {
        calls += 1;
        None
    });
    assert_eq!(calls, 1);
    let (first, again) = (first.unwrap(), again.unwrap());
    assert_eq!(first.bytes().as_ptr(), again.bytes().as_ptr());
    assert_eq!(first.as_text(), Some("{\"id\":72623859790382856}"));
    // "Not shown in this dialect" is cached as well.
    assert!(shared.rendered(Dialect::Sse, |_| None).is_none());
    assert!(
        shared
            .rendered(Dialect::Sse, |_| Some(Frame::Binary(Bytes::new())))
            .is_none()
    );
}

#[tokio::test]
async fn an_awaiting_renderer_runs_once_while_others_wait_for_it() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let shared = SharedEnvelope::new(sample());
    let calls = Arc::new(AtomicUsize::new(0));
    let (release, gate) = tokio::sync::watch::channel(false);
    let mut waiting = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (shared, calls, mut gate) = (shared.clone(), calls.clone(), gate.clone());
        waiting.spawn(async move {
            shared
                .rendered_async(Dialect::CloudWs, |env| async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    // Hold the render open until every task is queued behind it.
                    let _ = gate.wait_for(|open| *open).await;
                    Some(Frame::text(format!("{}", env.id)))
                })
                .await
        });
    }
    tokio::task::yield_now().await;
    release.send_replace(true);
    let mut frames = Vec::new();
    while let Some(frame) = waiting.join_next().await {
        frames.push(frame.unwrap().unwrap());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        frames
            .windows(2)
            .all(|w| w[0].bytes().as_ptr() == w[1].bytes().as_ptr())
    );
}
