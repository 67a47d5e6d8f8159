//! Reader for the IDX format of MNIST and Fashion-MNIST, raw or gzip-compressed.
//!
//! An IDX file is a header followed by the items:
//!
//! | bytes        | meaning                                                         |
//! |--------------|-----------------------------------------------------------------|
//! | 0–1          | `00 00`                                                         |
//! | 2            | element type; only `0x08` (unsigned byte) is supported here     |
//! | 3            | number of dimensions `d`                                        |
//! | 4 … 4 + 4d   | `d` sizes, each a big-endian `u32`                              |
//! | then         | the product of the sizes, one byte each, row-major              |
//!
//! Image files are 3-D (`[n, rows, cols]`), label files 1-D (`[n]`). A file may be stored raw or
//! gzip-compressed; compression is detected by the gzip magic bytes `1f 8b`, never by the file
//! name.
//!
//! Everything from the header is checked before it is trusted: the magic, the type, the number
//! of dimensions, that the product of the sizes does not overflow, and that the data holds
//! exactly that many bytes (a short file is [`DataError::Truncated`], a long one
//! [`DataError::TrailingBytes`]). Nothing is allocated from a header's claim alone: a raw file
//! is already in memory before its header is read, and a gzip stream is decompressed only as far
//! as its header says (plus one byte, to detect trailing data), with at most
//! [`MAX_DECODED_BYTES`] in all, so neither a lying header nor a zip bomb can exhaust memory.
//!
//! Pixels are kept as the file's bytes ([`Dataset::pixels`]) and converted to `f32` by
//! [`pixel_value`] only where a batch is built ([`crate::data::gather`],
//! [`Dataset::images_f32`]), so a dataset takes one byte per pixel in memory.
//!
//! Every [`DataError`] message is a single line that starts with the path concerned; an OS error
//! is said once, with its real cause (a directory, a symbolic-link loop, a permission).

use std::borrow::Cow;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where `apt-get install dataset-fashion-mnist` puts Fashion-MNIST: the four `*-ubyte.gz`
/// files of the standard distribution.
pub const DEFAULT_DATA_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The most bytes a file may hold, or decompress to (1 GiB). Larger inputs are
/// [`DataError::TooLarge`]; Fashion-MNIST's largest file is 47 MB decompressed.
pub const MAX_DECODED_BYTES: u64 = 1 << 30;

/// The largest label accepted. Under [`load`] the number of classes of a dataset is its largest
/// label plus one, and capping labels at 254 keeps that count within a `u8` too (at most 255
/// classes); [`load_with_classes`] fixes the count instead.
pub const MAX_LABEL: u8 = 254;

/// The IDX element type code of unsigned bytes, the only one supported.
pub const IDX_TYPE_U8: u8 = 0x08;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Deflate cannot expand data by more than about 1032:1, which bounds the memory reserved up
/// front for decompressed output by the size of the compressed input.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Why a dataset could not be loaded. Every message is one line and names the file or
/// directory concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The data directory does not exist.
    #[error("{}: data directory not found; {}", .path.display(), install_hint(.path))]
    Missing {
        /// The directory that was looked for.
        path: PathBuf,
    },
    /// The data directory's path names something else (a file, a device).
    #[error("{}: not a directory (it is {kind}); give the directory holding the dataset files", .path.display())]
    NotADirectory {
        /// The path given.
        path: PathBuf,
        /// What it is (`a regular file`, …).
        kind: &'static str,
    },
    /// A dataset file's name is taken by something that is not a regular file (a directory, a
    /// device, a FIFO, a dangling symbolic link).
    #[error("{}: not a regular file (it is {kind})", .path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// A dataset file exists neither raw nor with a `.gz` suffix.
    #[error("{}: file not found (looked for it raw and with a .gz suffix); {}", .path.display(), install_hint(.path))]
    MissingFile {
        /// The file that was looked for, without the `.gz` suffix.
        path: PathBuf,
    },
    /// Reading the file or directory failed (permission denied, a symbolic-link loop, …). The
    /// OS error is part of the message and deliberately not reported again as the error's
    /// `source()`, so a printed error chain says it once.
    #[error("{}: cannot read: {error}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        error: io::Error,
    },
    /// The file does not start with the IDX magic `00 00`.
    #[error("{}: not an IDX file (starts with {:02x} {:02x}, expected 00 00)", .path.display(), .found[0], .found[1])]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// Its first two bytes.
        found: [u8; 2],
    },
    /// The element type is not `0x08` (unsigned byte).
    #[error("{}: unsupported IDX element type 0x{type_byte:02x} ({}); only 0x08 (unsigned byte) is supported", .path.display(), type_name(*.type_byte))]
    UnsupportedType {
        /// The file.
        path: PathBuf,
        /// The type byte found.
        type_byte: u8,
    },
    /// The dimensions do not fit the file's role (images 3-D with nonzero rows and columns,
    /// labels 1-D), or their product overflows.
    #[error("{}: bad IDX dimensions: {detail}", .path.display())]
    BadDims {
        /// The file.
        path: PathBuf,
        /// What is wrong with them.
        detail: String,
    },
    /// The file (decompressed) is shorter than its header says.
    #[error("{}: truncated: the header describes {expected} bytes but the file holds {actual}", .path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header describes (header included).
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The file (decompressed) is longer than its header says.
    #[error("{}: trailing data: at least {extra} byte(s) beyond the {expected} the header describes", .path.display())]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// Bytes the header describes (header included).
        expected: u64,
        /// Extra bytes seen (for gzip input reading stops at the first extra byte, so this is a
        /// lower bound).
        extra: u64,
    },
    /// The image and label files of a split hold different numbers of items.
    #[error("{}: {images} images but {labels} labels in {}", .images_path.display(), .labels_path.display())]
    CountMismatch {
        /// The image file.
        images_path: PathBuf,
        /// The label file.
        labels_path: PathBuf,
        /// Number of images.
        images: usize,
        /// Number of labels.
        labels: usize,
    },
    /// Training and test images have different sizes.
    #[error("{}: images are {}x{} but the test images in {} are {}x{}", .train_path.display(), .train.0, .train.1, .test_path.display(), .test.0, .test.1)]
    ShapeMismatch {
        /// The training image file.
        train_path: PathBuf,
        /// The test image file.
        test_path: PathBuf,
        /// Training image `(rows, cols)`.
        train: (usize, usize),
        /// Test image `(rows, cols)`.
        test: (usize, usize),
    },
    /// A split holds no examples (nothing to train on, or an accuracy of nothing).
    #[error("{}: the file holds no examples; a split must not be empty", .path.display())]
    Empty {
        /// The image file of the split.
        path: PathBuf,
    },
    /// A label is not below the class count the experiment fixed ([`load_with_classes`]).
    #[error("{}: label {label} at index {index} is outside the experiment's {classes} classes (0 to {})", .path.display(), .classes.saturating_sub(1))]
    LabelOutOfRange {
        /// The label file.
        path: PathBuf,
        /// Position of the first offending label.
        index: usize,
        /// Its value.
        label: u8,
        /// The class count.
        classes: usize,
    },
    /// A label exceeds [`MAX_LABEL`].
    #[error("{}: label {label} at index {index} exceeds the maximum label {max}", .path.display(), max = MAX_LABEL)]
    BadLabel {
        /// The label file.
        path: PathBuf,
        /// Position of the first offending label.
        index: usize,
        /// Its value.
        label: u8,
    },
    /// The file, or what it decompresses to or claims to hold, exceeds [`MAX_DECODED_BYTES`].
    #[error("{}: too large: {size} bytes exceeds the limit of {limit}", .path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size (or, for gzip input, the size its header claims or the bytes read so far).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The gzip stream is corrupt (the decoder's error is said once, as in [`DataError::Io`]).
    #[error("{}: corrupt gzip stream: {error}", .path.display())]
    Gzip {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        error: io::Error,
    },
}

/// How to get data, for [`DataError::Missing`] and [`DataError::MissingFile`].
fn install_hint(path: &Path) -> String {
    if path.starts_with(DEFAULT_DATA_DIR) {
        "install the default data (Fashion-MNIST) with `apt-get install dataset-fashion-mnist`".to_owned()
    } else {
        format!(
            "give a directory holding the four Fashion-MNIST IDX files (raw or .gz), or install \
             the default data into {DEFAULT_DATA_DIR} with `apt-get install dataset-fashion-mnist`"
        )
    }
}

/// Names of the IDX element types, for [`DataError::UnsupportedType`].
fn type_name(type_byte: u8) -> &'static str {
    match type_byte {
        0x08 => "unsigned byte",
        0x09 => "signed byte",
        0x0B => "i16",
        0x0C => "i32",
        0x0D => "f32",
        0x0E => "f64",
        _ => "unknown type",
    }
}

/// The value a pixel byte stands for: the byte divided by 255, in `[0, 1]`. The one definition
/// of the scaling, used wherever images become `f32`.
///
/// ```
/// use bnlab::data::idx::pixel_value;
/// assert_eq!((pixel_value(0), pixel_value(51), pixel_value(255)), (0.0, 0.2, 1.0));
/// ```
#[inline]
pub fn pixel_value(byte: u8) -> f32 {
    f32::from(byte) / 255.0
}

/// Writes [`pixel_value`] of each byte of `bytes` into `out`.
///
/// # Panics
/// If the lengths differ (a caller bug).
pub fn pixels_to_f32(bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        bytes.len(),
        out.len(),
        "pixels_to_f32: {} pixels into {} values",
        bytes.len(),
        out.len()
    );
    for (o, &b) in out.iter_mut().zip(bytes) {
        *o = pixel_value(b);
    }
}

/// One split of a dataset: images as bytes and their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// `len × (rows·cols)` pixels, row-major, as stored in the file (one byte each); the network
    /// sees [`pixel_value`] of each, through [`crate::data::gather`] or [`Dataset::images_f32`].
    pub pixels: Vec<u8>,
    /// `len` labels, each below `classes`.
    pub labels: Vec<u8>,
    /// Number of examples.
    pub len: usize,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// Number of classes: under [`load`] the largest label plus one, the larger of the two
    /// splits' counts; under [`load_with_classes`] the count given.
    pub classes: usize,
}

impl Dataset {
    /// Values per example: `rows · cols`.
    pub fn features(&self) -> usize {
        self.rows * self.cols
    }

    /// Writes the pixels of examples `examples` (consecutive, row-major) into `out` as `f32`
    /// ([`pixel_value`]: the same values the loader produced when it kept `f32` pixels).
    ///
    /// ```
    /// use bnlab::data::Dataset;
    ///
    /// let ds = Dataset { pixels: vec![0, 51, 102, 255], labels: vec![0, 1], len: 2, rows: 1, cols: 2, classes: 2 };
    /// let mut out = [0.0; 2];
    /// ds.images_f32(1..2, &mut out);
    /// assert_eq!(out, [0.4, 1.0]);
    /// ```
    ///
    /// # Panics
    /// If `examples` does not lie within `0..len`, or `out.len()` is not
    /// `examples.len() * features()` (caller bugs, not data errors).
    pub fn images_f32(&self, examples: Range<usize>, out: &mut [f32]) {
        assert!(
            examples.start <= examples.end && examples.end <= self.len,
            "images_f32: examples {examples:?} out of range for {} examples",
            self.len
        );
        let f = self.features();
        pixels_to_f32(&self.pixels[examples.start * f..examples.end * f], out);
    }
}

/// Which half of a dataset to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training set (`train-*`; 60 000 examples in Fashion-MNIST).
    Train,
    /// The test set (`t10k-*`; 10 000 examples in Fashion-MNIST).
    Test,
}

impl Split {
    /// The image file's standard name, without `.gz`.
    pub fn images_file(self) -> &'static str {
        match self {
            Split::Train => "train-images-idx3-ubyte",
            Split::Test => "t10k-images-idx3-ubyte",
        }
    }

    /// The label file's standard name, without `.gz`.
    pub fn labels_file(self) -> &'static str {
        match self {
            Split::Train => "train-labels-idx1-ubyte",
            Split::Test => "t10k-labels-idx1-ubyte",
        }
    }
}

/// Images parsed from an IDX file by [`parse_images`].
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    /// `len × (rows·cols)` pixels, row-major, the file's bytes (see [`pixel_value`]).
    pub pixels: Vec<u8>,
    /// Number of images.
    pub len: usize,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
}

/// Labels parsed from an IDX file by [`parse_labels`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    /// The labels, each at most [`MAX_LABEL`].
    pub labels: Vec<u8>,
    /// The largest label plus one (0 when there are no labels).
    pub classes: usize,
}

/// A checked IDX header.
struct Header {
    /// The sizes, at most 255 of them.
    dims: Vec<u32>,
    /// Bytes of header: `4 + 4 · dims.len()`.
    header_len: usize,
    /// Bytes of header plus data, as the header describes them.
    total_len: u64,
}

/// Reads and checks the header at the start of `bytes` (which may hold only a prefix of the
/// file), without looking at the data.
fn parse_header(bytes: &[u8], path: &Path) -> Result<Header, DataError> {
    let truncated = |expected: usize| DataError::Truncated {
        path: path.to_path_buf(),
        expected: expected as u64,
        actual: bytes.len() as u64,
    };
    if let [a, b, ..] = *bytes {
        if [a, b] != [0, 0] {
            return Err(DataError::BadMagic {
                path: path.to_path_buf(),
                found: [a, b],
            });
        }
    }
    let [_, _, type_byte, ndims, ..] = *bytes else {
        return Err(truncated(4));
    };
    if type_byte != IDX_TYPE_U8 {
        return Err(DataError::UnsupportedType {
            path: path.to_path_buf(),
            type_byte,
        });
    }
    let header_len = 4 + 4 * usize::from(ndims);
    let sizes = bytes.get(4..header_len).ok_or_else(|| truncated(header_len))?;
    let dims: Vec<u32> = sizes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let total_len = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d)))
        .and_then(|items| items.checked_add(header_len as u64))
        .ok_or_else(|| DataError::BadDims {
            path: path.to_path_buf(),
            detail: format!("the sizes {} multiply past 2^64", show_dims(&dims)),
        })?;
    Ok(Header {
        dims,
        header_len,
        total_len,
    })
}

/// Checks `bytes` as a complete IDX file with `want` dimensions and returns the sizes and the
/// data.
fn split_body<'a>(bytes: &'a [u8], path: &Path, want: usize, what: &str) -> Result<(Vec<u32>, &'a [u8]), DataError> {
    let header = parse_header(bytes, path)?;
    if header.dims.len() != want {
        return Err(bad_dims_count(path, &header.dims, want, what));
    }
    let actual = bytes.len() as u64;
    if actual < header.total_len {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: header.total_len,
            actual,
        });
    }
    if actual > header.total_len {
        return Err(DataError::TrailingBytes {
            path: path.to_path_buf(),
            expected: header.total_len,
            extra: actual - header.total_len,
        });
    }
    // `header_len <= total_len == bytes.len()`, so this cannot fail; stay panic-free anyway.
    let data = bytes.get(header.header_len..).unwrap_or_default();
    Ok((header.dims, data))
}

fn bad_dims_count(path: &Path, dims: &[u32], want: usize, what: &str) -> DataError {
    DataError::BadDims {
        path: path.to_path_buf(),
        detail: format!(
            "{what} files must have {want} dimension(s), found {} ({})",
            dims.len(),
            show_dims(dims)
        ),
    }
}

/// Header sizes for an error message, cut after the first few so that a header of 255 sizes
/// still gives a short line: `[1, 2, 3]`, or `[1, 2, 3, 4, 5, 6, …] (255 sizes)`.
fn show_dims(dims: &[u32]) -> String {
    const SHOWN: usize = 6;
    if dims.len() <= SHOWN {
        return format!("{dims:?}");
    }
    let head: Vec<String> = dims[..SHOWN].iter().map(u32::to_string).collect();
    format!("[{}, …] ({} sizes)", head.join(", "), dims.len())
}

/// Converts a size already checked against data in memory.
fn to_usize(n: u32) -> usize {
    // Lossless on every target with at least 32-bit pointers, the only ones Rust's std supports
    // with files of this kind; the data length check has already bounded `n`.
    n as usize
}

/// Parses an IDX image file (`[n, rows, cols]`, unsigned bytes) from its bytes, raw or gzip.
///
/// `path` only labels errors. Pixels are kept as bytes (see [`pixel_value`] for their value).
/// Rows and columns must be nonzero; `n` may be zero (the loaders refuse an empty split).
///
/// This never panics, whatever `bytes` holds, and never allocates more than the input (or its
/// decompressed form, capped at [`MAX_DECODED_BYTES`]) justifies.
///
/// # Errors
/// [`DataError::BadMagic`], [`DataError::UnsupportedType`], [`DataError::BadDims`],
/// [`DataError::Truncated`], [`DataError::TrailingBytes`], and for gzip input
/// [`DataError::Gzip`] or [`DataError::TooLarge`].
///
/// ```
/// use bnlab::data::idx::parse_images;
/// use std::path::Path;
///
/// // Two 1×2 images.
/// let bytes = [0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 255, 51, 102];
/// let images = parse_images(&bytes, Path::new("in-memory")).unwrap();
/// assert_eq!((images.len, images.rows, images.cols), (2, 1, 2));
/// assert_eq!(images.pixels, [0, 255, 51, 102]);
/// ```
pub fn parse_images(bytes: &[u8], path: &Path) -> Result<Images, DataError> {
    let decoded = decode(bytes, path, MAX_DECODED_BYTES)?;
    let (dims, data) = split_body(&decoded, path, 3, "image")?;
    let [len, rows, cols] = match dims[..] {
        [n, r, c] => [n, r, c].map(to_usize),
        // `split_body` has checked there are three.
        _ => return Err(bad_dims_count(path, &dims, 3, "image")),
    };
    if rows == 0 || cols == 0 {
        return Err(DataError::BadDims {
            path: path.to_path_buf(),
            detail: format!("images must have nonzero rows and columns, found {rows}x{cols}"),
        });
    }
    Ok(Images {
        pixels: data.to_vec(),
        len,
        rows,
        cols,
    })
}

/// Parses an IDX label file (`[n]`, unsigned bytes) from its bytes, raw or gzip.
///
/// `path` only labels errors. Labels above [`MAX_LABEL`] (254) are rejected; the number of
/// classes is the largest label plus one. Never panics, whatever `bytes` holds.
///
/// # Errors
/// As [`parse_images`] (with labels 1-D), plus [`DataError::BadLabel`].
///
/// ```
/// use bnlab::data::idx::parse_labels;
/// use std::path::Path;
///
/// let bytes = [0, 0, 8, 1, 0, 0, 0, 3, 2, 0, 1];
/// let labels = parse_labels(&bytes, Path::new("in-memory")).unwrap();
/// assert_eq!((labels.labels.as_slice(), labels.classes), (&[2, 0, 1][..], 3));
/// ```
pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<Labels, DataError> {
    let decoded = decode(bytes, path, MAX_DECODED_BYTES)?;
    let (_, data) = split_body(&decoded, path, 1, "label")?;
    if let Some((index, &label)) = data.iter().enumerate().find(|&(_, &l)| l > MAX_LABEL) {
        return Err(DataError::BadLabel {
            path: path.to_path_buf(),
            index,
            label,
        });
    }
    let classes = data.iter().max().map_or(0, |&m| usize::from(m) + 1);
    Ok(Labels {
        labels: data.to_vec(),
        classes,
    })
}

/// Returns `bytes` itself, or, if it starts with the gzip magic, its decompressed form.
fn decode<'a>(bytes: &'a [u8], path: &Path, limit: u64) -> Result<Cow<'a, [u8]>, DataError> {
    if bytes.starts_with(&GZIP_MAGIC) {
        gunzip(bytes, path, limit).map(Cow::Owned)
    } else {
        Ok(Cow::Borrowed(bytes))
    }
}

/// Decompresses a gzip stream holding one IDX file, reading only as far as its header
/// describes plus one byte (to detect trailing data).
fn gunzip(compressed: &[u8], path: &Path, limit: u64) -> Result<Vec<u8>, DataError> {
    let gz_err = |error: io::Error| DataError::Gzip {
        path: path.to_path_buf(),
        error,
    };
    let mut decoder = flate2::bufread::MultiGzDecoder::new(compressed);
    let mut out = Vec::with_capacity(4 + 4 * 255);
    (&mut decoder).take(4).read_to_end(&mut out).map_err(gz_err)?;
    if let [_, _, _, ndims] = *out {
        (&mut decoder)
            .take(4 * u64::from(ndims))
            .read_to_end(&mut out)
            .map_err(gz_err)?;
    }
    // A bad or incomplete header gives the same error the complete file would.
    let total = parse_header(&out, path)?.total_len;
    if total > limit {
        return Err(DataError::TooLarge {
            path: path.to_path_buf(),
            size: total,
            limit,
        });
    }
    // Reserve what the header claims, but no more than the compressed input can expand to:
    // a header's claim alone never causes a large allocation.
    let bound = (compressed.len() as u64)
        .saturating_mul(MAX_DEFLATE_RATIO)
        .saturating_add(1024);
    let want = total.saturating_add(1).min(bound);
    out.reserve(usize::try_from(want).unwrap_or(0).saturating_sub(out.len()));
    let remaining = total.saturating_add(1).saturating_sub(out.len() as u64);
    decoder.take(remaining).read_to_end(&mut out).map_err(gz_err)?;
    Ok(out)
}

/// What a file that is not what was expected is (`a directory`, `a character device`, …), for
/// error messages.
pub(crate) fn file_kind(t: fs::FileType) -> &'static str {
    let kinds: [(fn(&fs::FileType) -> bool, &'static str); 7] = [
        (fs::FileType::is_file, "a regular file"),
        (fs::FileType::is_dir, "a directory"),
        (fs::FileType::is_symlink, "a symbolic link"),
        (FileTypeExt::is_char_device, "a character device"),
        (FileTypeExt::is_block_device, "a block device"),
        (FileTypeExt::is_fifo, "a FIFO"),
        (FileTypeExt::is_socket, "a socket"),
    ];
    kinds
        .iter()
        .find(|(is, _)| is(&t))
        .map_or("of an unknown kind", |&(_, kind)| kind)
}

/// Opens `path` for reading without blocking (a FIFO without a writer cannot hang the reader)
/// and refuses anything but a regular file; returns the file and its size. A failure to open it
/// or read its metadata is `io_err`'s error, another kind of file `not_regular`'s (given
/// [`file_kind`]).
pub(crate) fn open_regular_file<E>(
    path: &Path,
    io_err: impl Fn(io::Error) -> E,
    not_regular: impl FnOnce(&'static str) -> E,
) -> Result<(fs::File, u64), E> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(&io_err)?;
    let meta = file.metadata().map_err(&io_err)?;
    if !meta.is_file() {
        return Err(not_regular(file_kind(meta.file_type())));
    }
    Ok((file, meta.len()))
}

/// Reads a whole regular file of at most `limit` bytes. Opened without blocking (a FIFO that
/// slipped in after [`locate`] cannot hang the reader) and refused unless it is a regular file.
fn read_file(path: &Path, limit: u64) -> Result<Vec<u8>, DataError> {
    let io_err = |error: io::Error| {
        if error.kind() == io::ErrorKind::NotFound {
            DataError::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            DataError::Io {
                path: path.to_path_buf(),
                error,
            }
        }
    };
    let not_a_file = |kind| DataError::NotAFile {
        path: path.to_path_buf(),
        kind,
    };
    let (file, size) = open_regular_file(path, io_err, not_a_file)?;
    let too_large = |size: u64| DataError::TooLarge {
        path: path.to_path_buf(),
        size,
        limit,
    };
    if size > limit {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0).saturating_add(1));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// `Some(path)` when `path` is a regular file (after following symbolic links), `None` when
/// nothing is there; otherwise the real cause: [`DataError::NotAFile`] (a directory, a device,
/// a dangling symbolic link) or [`DataError::Io`] (a symbolic-link loop, a permission).
fn probe(path: PathBuf) -> Result<Option<PathBuf>, DataError> {
    match fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(Some(path)),
        Ok(m) => Err(DataError::NotAFile {
            kind: file_kind(m.file_type()),
            path,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::symlink_metadata(&path) {
            Ok(_) => Err(DataError::NotAFile {
                path,
                kind: "a symbolic link to nothing",
            }),
            Err(_) => Ok(None),
        },
        Err(error) => Err(DataError::Io { path, error }),
    }
}

/// Finds `name` in `dir`, raw or with a `.gz` suffix (the raw file wins when both exist, as it
/// needs no decompression). The content decides whether it is decompressed, not the name.
/// Anything but a regular file or nothing under either name is an error naming it (see
/// [`probe`]).
fn locate(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    let raw = dir.join(name);
    if let Some(path) = probe(raw.clone())? {
        return Ok(path);
    }
    if let Some(path) = probe(dir.join(format!("{name}.gz")))? {
        return Ok(path);
    }
    Err(DataError::MissingFile { path: raw })
}

fn check_dir(dir: &Path) -> Result<(), DataError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) => Err(DataError::NotADirectory {
            path: dir.to_path_buf(),
            kind: file_kind(m.file_type()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(DataError::Missing {
            path: dir.to_path_buf(),
        }),
        Err(error) => Err(DataError::Io {
            path: dir.to_path_buf(),
            error,
        }),
    }
}

/// Loads one split from `dir`, which holds the standard file names (see [`Split::images_file`]
/// and [`Split::labels_file`]), each raw or with a `.gz` suffix.
///
/// # Errors
/// [`DataError::Missing`] if `dir` does not exist, [`DataError::NotADirectory`] if it is not a
/// directory, [`DataError::MissingFile`] if a file is absent, [`DataError::NotAFile`] if its
/// name is taken by a directory, a device or a dangling link, [`DataError::Io`] for a
/// permission or a symbolic-link loop, [`DataError::CountMismatch`] if the files disagree on the
/// number of examples, [`DataError::Empty`] if they hold none, and any error of
/// [`parse_images`] / [`parse_labels`].
pub fn load_split(dir: &Path, split: Split) -> Result<Dataset, DataError> {
    check_dir(dir)?;
    Ok(load_split_files(dir, split)?.dataset)
}

/// A split as loaded, with the paths of its files (for later errors).
struct Loaded {
    dataset: Dataset,
    images_path: PathBuf,
    labels_path: PathBuf,
}

fn load_split_files(dir: &Path, split: Split) -> Result<Loaded, DataError> {
    let images_path = locate(dir, split.images_file())?;
    let labels_path = locate(dir, split.labels_file())?;
    let images = parse_images(&read_file(&images_path, MAX_DECODED_BYTES)?, &images_path)?;
    let labels = parse_labels(&read_file(&labels_path, MAX_DECODED_BYTES)?, &labels_path)?;
    if images.len != labels.labels.len() {
        return Err(DataError::CountMismatch {
            images_path,
            labels_path,
            images: images.len,
            labels: labels.labels.len(),
        });
    }
    if images.len == 0 {
        return Err(DataError::Empty { path: images_path });
    }
    let dataset = Dataset {
        pixels: images.pixels,
        len: images.len,
        rows: images.rows,
        cols: images.cols,
        labels: labels.labels,
        classes: labels.classes,
    };
    Ok(Loaded {
        dataset,
        images_path,
        labels_path,
    })
}

/// Both splits, checked to have images of one size.
fn load_both(dir: &Path) -> Result<(Loaded, Loaded), DataError> {
    check_dir(dir)?;
    let train = load_split_files(dir, Split::Train)?;
    let test = load_split_files(dir, Split::Test)?;
    let (a, b) = (&train.dataset, &test.dataset);
    if (a.rows, a.cols) != (b.rows, b.cols) {
        return Err(DataError::ShapeMismatch {
            train_path: train.images_path,
            test_path: test.images_path,
            train: (a.rows, a.cols),
            test: (b.rows, b.cols),
        });
    }
    Ok((train, test))
}

/// Loads `(train, test)` from `dir` (usually [`DEFAULT_DATA_DIR`]), the number of classes taken
/// from the labels.
///
/// Both splits get the same `classes`, the larger of their own counts, so a test set that lacks
/// the highest class still has outputs for it. An experiment whose class count is fixed uses
/// [`load_with_classes`] instead, so that a stray label is an error rather than extra outputs.
///
/// # Errors
/// As [`load_split`] for either split, plus [`DataError::ShapeMismatch`] if the two splits'
/// images differ in size.
///
/// ```no_run
/// use bnlab::data::idx::{load, DEFAULT_DATA_DIR};
///
/// let (train, test) = load(DEFAULT_DATA_DIR.as_ref())?;
/// assert_eq!((train.len, test.len, train.features(), train.classes), (60_000, 10_000, 784, 10));
/// # Ok::<(), bnlab::data::idx::DataError>(())
/// ```
pub fn load(dir: &Path) -> Result<(Dataset, Dataset), DataError> {
    let (train, test) = load_both(dir)?;
    let (mut train, mut test) = (train.dataset, test.dataset);
    let classes = train.classes.max(test.classes);
    train.classes = classes;
    test.classes = classes;
    Ok((train, test))
}

/// Loads `(train, test)` from `dir` for an experiment of exactly `classes` classes: both splits
/// get `classes`, and every label must be below it.
///
/// # Errors
/// As [`load`], plus [`DataError::LabelOutOfRange`] naming the label file and the index and
/// value of the first label `>= classes` (the training labels are checked first).
///
/// ```no_run
/// use bnlab::data::idx::{load_with_classes, DEFAULT_DATA_DIR};
///
/// let (train, test) = load_with_classes(DEFAULT_DATA_DIR.as_ref(), 10)?;
/// assert_eq!((train.classes, test.classes), (10, 10));
/// # Ok::<(), bnlab::data::idx::DataError>(())
/// ```
pub fn load_with_classes(dir: &Path, classes: usize) -> Result<(Dataset, Dataset), DataError> {
    let (train, test) = load_both(dir)?;
    let mut out = [train, test].map(|l| (l.dataset, l.labels_path));
    for (ds, labels_path) in &mut out {
        let bad = ds.labels.iter().enumerate().find(|&(_, &l)| usize::from(l) >= classes);
        if let Some((index, &label)) = bad {
            return Err(DataError::LabelOutOfRange {
                path: labels_path.clone(),
                index,
                label,
                classes,
            });
        }
        ds.classes = classes;
    }
    let [(train, _), (test, _)] = out;
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, IDX_TYPE_U8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn header_overflow_is_an_error() {
        let bytes = idx(&[u32::MAX, u32::MAX, u32::MAX], &[]);
        let err = parse_images(&bytes, Path::new("x")).unwrap_err();
        assert!(matches!(err, DataError::BadDims { .. }), "{err}");
    }

    #[test]
    fn header_prefix_errors() {
        let p = Path::new("p");
        assert!(matches!(
            parse_header(&[], p),
            Err(DataError::Truncated {
                expected: 4,
                actual: 0,
                ..
            })
        ));
        assert!(matches!(parse_header(&[1], p), Err(DataError::Truncated { .. })));
        assert!(matches!(
            parse_header(&[0, 1], p),
            Err(DataError::BadMagic { found: [0, 1], .. })
        ));
        assert!(matches!(
            parse_header(&[0, 0, 8, 2, 0, 0, 0], p),
            Err(DataError::Truncated {
                expected: 12,
                actual: 7,
                ..
            })
        ));
        let h = parse_header(&idx(&[2, 3], &[]), p).unwrap();
        assert_eq!((h.dims, h.header_len, h.total_len), (vec![2, 3], 12, 18));
    }

    #[test]
    fn gunzip_stops_at_the_claimed_length() {
        use flate2::{write::GzEncoder, Compression};
        use std::io::Write;
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(&idx(&[4], &[1, 2, 3, 4])).unwrap();
        enc.write_all(&[0u8; 100_000]).unwrap();
        let gz = enc.finish().unwrap();
        let out = gunzip(&gz, Path::new("g"), MAX_DECODED_BYTES).unwrap();
        assert_eq!(out.len(), 8 + 4 + 1);
    }

    #[test]
    fn gunzip_respects_the_limit() {
        use flate2::{write::GzEncoder, Compression};
        use std::io::Write;
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(&idx(&[100], &[0; 100])).unwrap();
        let gz = enc.finish().unwrap();
        let err = gunzip(&gz, Path::new("g"), 50).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TooLarge {
                    size: 108,
                    limit: 50,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(gunzip(&gz, Path::new("g"), 108).unwrap().len(), 108);
    }
}
