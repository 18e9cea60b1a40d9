//! The sim's `input/`, `output/` and `temp/` folders, kept in memory so a sim
//! needs no disk and leaves nothing behind.

use std::collections::BTreeMap;

use bytes::Bytes;

/// ComfyUI's three file roots (`folder_paths.get_directory_by_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Root {
    Input,
    Output,
    Temp,
}

impl Root {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "input" => Some(Root::Input),
            "output" => Some(Root::Output),
            "temp" => Some(Root::Temp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Root::Input => "input",
            Root::Output => "output",
            Root::Temp => "temp",
        }
    }
}

#[derive(Default)]
pub struct FileStore {
    files: BTreeMap<(Root, String, String), Bytes>,
}

/// Joins a subfolder the way `os.path.normpath` would, refusing escapes.
pub fn normalize_subfolder(sub: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in sub.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    if sub.starts_with('/') {
        return None;
    }
    Some(parts.join("/"))
}

impl FileStore {
    pub fn put(&mut self, root: Root, subfolder: &str, name: &str, data: Bytes) {
        self.files
            .insert((root, subfolder.to_owned(), name.to_owned()), data);
    }

    pub fn get(&self, root: Root, subfolder: &str, name: &str) -> Option<Bytes> {
        self.files
            .get(&(root, subfolder.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Top-level input files, sorted: the LoadImage option list.
    pub fn input_images(&self) -> Vec<String> {
        self.files
            .keys()
            .filter(|(root, sub, _)| *root == Root::Input && sub.is_empty())
            .map(|(_, _, name)| name.clone())
            .collect()
    }

    /// `folder_paths.get_save_image_path`'s counter: one past the highest
    /// `<prefix>_NNNNN_` already in the folder.
    pub fn next_counter(&self, root: Root, subfolder: &str, prefix: &str) -> u32 {
        let start = format!("{prefix}_");
        self.files
            .keys()
            .filter(|(r, s, _)| *r == root && s == subfolder)
            .filter_map(|(_, _, name)| {
                let rest = name.strip_prefix(&start)?;
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if digits.len() == 5 && rest[5..].starts_with('_') {
                    digits.parse::<u32>().ok()
                } else {
                    None
                }
            })
            .max()
            .map_or(1, |n| n + 1)
    }
}

/// `mimetypes.guess_type` for what the sim stores.
pub fn mime_for(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "json" => "application/json",
        "txt" => "text/plain",
        "wav" => "audio/x-wav",
        "flac" => "audio/flac",
        // Never let a stored file run as a page (ComfyUI forces these to octet-stream).
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_follows_existing_files() {
        let mut fs = FileStore::default();
        assert_eq!(fs.next_counter(Root::Output, "", "a"), 1);
        fs.put(Root::Output, "", "a_00001_.png", Bytes::new());
        fs.put(Root::Output, "", "a_b_00007_.png", Bytes::new());
        assert_eq!(fs.next_counter(Root::Output, "", "a"), 2);
        assert_eq!(normalize_subfolder("x/../y"), Some("y".to_owned()));
        assert_eq!(normalize_subfolder("../y"), None);
    }
}
