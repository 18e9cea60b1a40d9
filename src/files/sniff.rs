//! What a file is: image uploads by their magic bytes, served files by their name.
//!
//! An upload's declared `Content-Type` and extension are whatever the client claims;
//! the first bytes are what the workflow's image loader will actually see, so an
//! upload that must be an image is judged by [`sniff_image`].

/// An image format ComfyUI's loaders accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageKind {
    Png,
    Jpeg,
    Webp,
}

impl ImageKind {
    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }

    /// The usual extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
            Self::Webp => "webp",
        }
    }
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
/// SOI marker followed by the first byte of the next marker.
const JPEG_SIGNATURE: &[u8] = b"\xff\xd8\xff";

/// The image format of `bytes` judged by its signature, or `None` if it is not one
/// of the [`ImageKind`]s. Needs only the first 12 bytes.
pub fn sniff_image(bytes: &[u8]) -> Option<ImageKind> {
    if bytes.starts_with(PNG_SIGNATURE) {
        Some(ImageKind::Png)
    } else if bytes.starts_with(JPEG_SIGNATURE) {
        Some(ImageKind::Jpeg)
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        // A RIFF container whose form type is WEBP; bytes 4..8 are the chunk size.
        Some(ImageKind::Webp)
    } else {
        None
    }
}

/// The `Content-Type` to serve a stored file with, from its extension
/// (case-insensitive); unknown kinds are served as `application/octet-stream` so a
/// browser downloads rather than guesses.
pub fn content_type_for(filename: &str) -> &'static str {
    let Some((_, ext)) = filename.rsplit_once('.') else {
        return OCTET_STREAM;
    };
    match ext.to_ascii_lowercase().as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        _ => OCTET_STREAM,
    }
}

const OCTET_STREAM: &str = "application/octet-stream";

#[cfg(test)]
mod tests {
    use super::*;

    /// The first bytes of a real 1×1 PNG (signature + IHDR).
    const PNG: &[u8] = &[
        0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44,
        0x52, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00,
    ];
    /// A JFIF JPEG's SOI + APP0 header.
    const JPEG: &[u8] = &[
        0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10, 0x4a, 0x46, 0x49, 0x46, 0x00, 0x01, 0x01, 0x00,
    ];
    /// A lossy WebP's RIFF header and VP8 chunk tag.
    const WEBP: &[u8] = b"RIFF\x24\x00\x00\x00WEBPVP8 \x18\x00\x00\x00";

    #[test]
    fn sniffs_real_headers() {
        assert_eq!(sniff_image(PNG), Some(ImageKind::Png));
        assert_eq!(sniff_image(JPEG), Some(ImageKind::Jpeg));
        assert_eq!(sniff_image(WEBP), Some(ImageKind::Webp));
        assert_eq!(ImageKind::Webp.mime(), "image/webp");
        assert_eq!(ImageKind::Jpeg.extension(), "jpg");
    }

    #[test]
    fn text_and_lookalikes_are_not_images() {
        assert_eq!(sniff_image(b"hello, world\n"), None);
        assert_eq!(sniff_image(b""), None);
        assert_eq!(sniff_image(&PNG[..7]), None);
        assert_eq!(sniff_image(b"\xff\xd8"), None);
        assert_eq!(sniff_image(b"RIFF\x24\x00\x00\x00WAVEfmt "), None);
        assert_eq!(sniff_image(b"RIFF\x24\x00\x00\x00WEB"), None);
        assert_eq!(
            sniff_image(b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
            None
        );
    }

    #[test]
    fn content_types_by_extension() {
        assert_eq!(content_type_for("a.PNG"), "image/png");
        assert_eq!(content_type_for("a.jpeg"), "image/jpeg");
        assert_eq!(content_type_for("a.jpg"), "image/jpeg");
        assert_eq!(content_type_for("clip.mov"), "video/quicktime");
        assert_eq!(content_type_for("v.webm"), "video/webm");
        assert_eq!(content_type_for("meta.json"), "application/json");
        assert_eq!(content_type_for("x.svg"), "application/octet-stream");
        assert_eq!(content_type_for("x.html"), "application/octet-stream");
        assert_eq!(content_type_for("noext"), "application/octet-stream");
    }
}
