//! Reading an upload body without letting it grow past the limit.
//!
//! The limit is enforced while reading: as soon as one more chunk would pass it the
//! read stops with [`UploadError::TooLarge`] (a 413), so a client cannot make a pod
//! buffer a 10 GB body to find out it was too big.

use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The largest upload accepted, in bytes. The default, 100 MiB, is ComfyUI's own
/// `max_upload_size` (104857600).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MaxUploadBytes(NonZeroU64);

impl MaxUploadBytes {
    pub const DEFAULT: Self = Self(NonZeroU64::new(100 * 1024 * 1024).unwrap());

    pub const fn new(bytes: NonZeroU64) -> Self {
        Self(bytes)
    }

    pub const fn get(self) -> u64 {
        self.0.get()
    }
}

impl Default for MaxUploadBytes {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for MaxUploadBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

/// A setting value that is not a positive whole number of bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a positive number of bytes")]
pub struct InvalidUploadLimit(String);

impl FromStr for MaxUploadBytes {
    type Err = InvalidUploadLimit;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse::<NonZeroU64>()
            .map(Self)
            .map_err(|_| InvalidUploadLimit(s.to_string()))
    }
}

/// Why an upload body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the upload is larger than the limit of {limit}")]
    TooLarge { limit: MaxUploadBytes },
    #[error("could not read the upload")]
    Read(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Collects a byte stream (a request body, a multipart field's
/// `into_stream()`-style feed) into memory, failing once it passes `limit`.
pub async fn read_stream_limited<S, E>(
    stream: S,
    limit: MaxUploadBytes,
) -> Result<Bytes, UploadError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| UploadError::Read(e.into()))?;
        if buf.len() as u64 + chunk.len() as u64 > limit.get() {
            return Err(UploadError::TooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Collects an async reader (e.g. a poem multipart [`Field::into_async_read`] or a
/// poem-openapi `Upload::into_async_read`) into memory, failing once it passes
/// `limit`.
///
/// [`Field::into_async_read`]: poem::web::Field::into_async_read
pub async fn read_limited<R>(reader: R, limit: MaxUploadBytes) -> Result<Bytes, UploadError>
where
    R: AsyncRead,
{
    // Reading one byte past the limit tells "exactly the limit" from "too large"
    // without ever holding more than limit + 1 bytes.
    let mut bounded = std::pin::pin!(reader.take(limit.get().saturating_add(1)));
    let mut buf = Vec::new();
    bounded
        .read_to_end(&mut buf)
        .await
        .map_err(|e| UploadError::Read(Box::new(e)))?;
    if buf.len() as u64 > limit.get() {
        return Err(UploadError::TooLarge { limit });
    }
    Ok(Bytes::from(buf))
}

/// Reads one poem multipart field with the limit applied.
pub async fn read_field(
    field: poem::web::Field,
    limit: MaxUploadBytes,
) -> Result<Bytes, UploadError> {
    read_limited(field.into_async_read(), limit).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(n: u64) -> MaxUploadBytes {
        MaxUploadBytes::new(NonZeroU64::new(n).unwrap())
    }

    #[test]
    fn default_matches_comfyui() {
        assert_eq!(MaxUploadBytes::default().get(), 104_857_600);
        assert_eq!("42".parse::<MaxUploadBytes>().unwrap().get(), 42);
        assert!("0".parse::<MaxUploadBytes>().is_err());
        assert!("-1".parse::<MaxUploadBytes>().is_err());
        assert!("lots".parse::<MaxUploadBytes>().is_err());
    }

    #[tokio::test]
    async fn reader_at_the_limit_passes_and_one_more_byte_fails() {
        let data = vec![7u8; 1000];
        let ok = read_limited(&data[..], limit(1000)).await.unwrap();
        assert_eq!(ok.len(), 1000);
        let err = read_limited(&data[..], limit(999)).await.unwrap_err();
        assert!(matches!(err, UploadError::TooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn stream_stops_at_the_first_chunk_past_the_limit() {
        // An endless stream: if the limit were checked only at the end, this would
        // never finish.
        let endless = futures_util::stream::repeat_with(|| {
            Ok::<_, std::io::Error>(Bytes::from_static(&[0u8; 64]))
        });
        let err = read_stream_limited(endless, limit(1000)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "the upload is larger than the limit of 1000 bytes"
        );
        let chunks = futures_util::stream::iter(
            [b"ab".as_slice(), b"cd"].map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c))),
        );
        assert_eq!(read_stream_limited(chunks, limit(4)).await.unwrap(), "abcd");
    }
}
