//! `Proxy-Authorization: Basic` (RFC 7617) with a strict, bounded base64.

/// Longest password accepted, in bytes (as RFC 1929 bounds SOCKS5).
pub const MAX_CREDENTIAL_LEN: usize = 255;

/// Longest username decoded, in bytes. Usernames over 255 bytes are read
/// anyway so that the policy can verify the key first and then answer
/// `ERR_INVALID_VALUE` (the rules are too long) rather than `AUTH_FAILED`.
pub const MAX_USERNAME_LEN: usize = 4096;

/// Longest base64 blob that can decode to `user:pass` within the bounds.
const MAX_ENCODED_LEN: usize = (MAX_USERNAME_LEN + 1 + MAX_CREDENTIAL_LEN).div_ceil(3) * 4;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Why a `Proxy-Authorization` value gave no credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Another scheme (`Bearer`, `Digest`, …): no usable credentials were
    /// offered (`ERR_AUTH_REQUIRED`). Every other variant means credentials
    /// were offered but are invalid (`AUTH_FAILED`).
    #[error("authorization scheme is not Basic")]
    NotBasic,
    /// Not strict standard base64 with padding, or not separated from the
    /// scheme by spaces.
    #[error("invalid base64 in Basic credentials")]
    InvalidBase64,
    /// The decoded credentials have no `:`.
    #[error("Basic credentials lack a colon")]
    MissingColon,
    /// Username longer than [`MAX_USERNAME_LEN`] or password longer than
    /// [`MAX_CREDENTIAL_LEN`].
    #[error("username or password too long")]
    TooLong,
    /// Username or password is not UTF-8.
    #[error("username or password is not UTF-8")]
    NotUtf8,
    /// The username is empty.
    #[error("empty username")]
    EmptyUsername,
}

/// Credentials decoded from `Basic`: one buffer, `user:pass`, both halves
/// checked to be UTF-8 and within their bounds.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicCredentials {
    decoded: Decoded,
    colon: usize,
}

/// Decoded credentials up to this length are kept inline (a username with
/// every rule and a session, and a 64-character key, fit): decoding them
/// allocates nothing.
const INLINE_DECODED: usize = 256;

/// The decoded bytes: inline when short, on the heap otherwise.
#[derive(Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "the inline variant is the point: it lives on the request's stack, not the heap"
)]
enum Decoded {
    Inline {
        bytes: [u8; INLINE_DECODED],
        len: usize,
    },
    Heap(Vec<u8>),
}

impl Decoded {
    fn as_slice(&self) -> &[u8] {
        match self {
            Decoded::Inline { bytes, len } => &bytes[..*len],
            Decoded::Heap(v) => v,
        }
    }
}

impl PartialEq for Decoded {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Decoded {}

impl BasicCredentials {
    /// The username (the part before the first `:`; never empty).
    pub fn username(&self) -> &str {
        // Checked by `decode_basic`.
        std::str::from_utf8(&self.decoded.as_slice()[..self.colon]).unwrap_or_default()
    }

    /// The password (the rest).
    pub fn password(&self) -> &str {
        std::str::from_utf8(&self.decoded.as_slice()[self.colon + 1..]).unwrap_or_default()
    }
}

impl std::fmt::Debug for BasicCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password is a package key: never printed.
        f.debug_struct("BasicCredentials")
            .field("username", &self.username())
            .field("password", &"***")
            .finish()
    }
}

/// Decodes `Basic <base64(user:pass)>`: the scheme is case-insensitive and
/// followed by one or more spaces; base64 is the standard alphabet with
/// padding and zero trailing bits; the username ends at the first `:`. No
/// allocation happens for a blob longer than the bounds allow, nor for
/// credentials of up to 256 decoded bytes; longer ones take one.
pub fn decode_basic(value: &[u8]) -> Result<BasicCredentials, AuthError> {
    let scheme_end = value
        .iter()
        .position(|b| matches!(b, b' ' | b'\t'))
        .unwrap_or(value.len());
    if !value[..scheme_end].eq_ignore_ascii_case(b"basic") {
        return Err(AuthError::NotBasic);
    }
    let rest = &value[scheme_end..];
    if rest.first() != Some(&b' ') {
        return Err(AuthError::InvalidBase64);
    }
    let blob = &rest[rest.iter().position(|b| *b != b' ').unwrap_or(rest.len())..];
    if blob.len() > MAX_ENCODED_LEN {
        return Err(AuthError::TooLong);
    }
    let decoded = decode_base64(blob).ok_or(AuthError::InvalidBase64)?;
    let bytes = decoded.as_slice();
    let colon = bytes
        .iter()
        .position(|b| *b == b':')
        .ok_or(AuthError::MissingColon)?;
    let (user, pass) = (&bytes[..colon], &bytes[colon + 1..]);
    if user.len() > MAX_USERNAME_LEN || pass.len() > MAX_CREDENTIAL_LEN {
        return Err(AuthError::TooLong);
    }
    if user.is_empty() {
        return Err(AuthError::EmptyUsername);
    }
    std::str::from_utf8(user).map_err(|_| AuthError::NotUtf8)?;
    std::str::from_utf8(pass).map_err(|_| AuthError::NotUtf8)?;
    Ok(BasicCredentials { decoded, colon })
}

/// Encodes credentials as a `Proxy-Authorization` value: `Basic <base64>`.
pub fn encode_basic(username: &str, password: &str) -> String {
    let raw = [username.as_bytes(), b":", password.as_bytes()].concat();
    let mut out = String::with_capacity(6 + raw.len().div_ceil(3) * 4);
    out.push_str("Basic ");
    for chunk in raw.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn sextet(b: u8) -> Option<u32> {
    let v = match b {
        b'A'..=b'Z' => b - b'A',
        b'a'..=b'z' => b - b'a' + 26,
        b'0'..=b'9' => b - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// Strict base64: standard alphabet, length a multiple of 4, padding only at
/// the end, unused bits zero. Short results are kept inline.
fn decode_base64(input: &[u8]) -> Option<Decoded> {
    if input.is_empty() || !input.len().is_multiple_of(4) {
        return None;
    }
    let room = input.len() / 4 * 3;
    if room <= INLINE_DECODED {
        let mut bytes = [0u8; INLINE_DECODED];
        let len = decode_base64_into(input, &mut bytes)?;
        Some(Decoded::Inline { bytes, len })
    } else {
        let mut v = vec![0u8; room];
        let len = decode_base64_into(input, &mut v)?;
        v.truncate(len);
        Some(Decoded::Heap(v))
    }
}

/// Decodes `input` (a non-empty multiple of 4 long) into `out`, which has
/// room for `input.len() / 4 * 3` bytes; returns the bytes written.
fn decode_base64_into(input: &[u8], out: &mut [u8]) -> Option<usize> {
    let quads = input.len() / 4;
    let mut len = 0;
    for (index, quad) in input.chunks_exact(4).enumerate() {
        let pad = match quad {
            [_, _, b'=', b'='] => 2,
            [_, _, _, b'='] => 1,
            _ => 0,
        };
        if pad > 0 && index + 1 != quads {
            return None;
        }
        let mut n = 0u32;
        for &b in &quad[..4 - pad] {
            n = n << 6 | sextet(b)?;
        }
        n <<= 6 * pad;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let keep = 3 - pad;
        if bytes[keep..].iter().any(|b| *b != 0) {
            return None; // non-zero unused bits: not canonical
        }
        out.get_mut(len..len + keep)?
            .copy_from_slice(&bytes[..keep]);
        len += keep;
    }
    Some(len)
}
