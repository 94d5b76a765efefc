//! Character-strings in zone-file form (RFC 1035 §5.1), read here rather than by hickory-proto,
//! whose lexer decodes `\DDD` wrongly (hickory-dns#3955: `(d1<<16)+(d2<<8)+d3`).
//!
//! A value is a run of tokens separated by spaces or tabs. A token is either quoted (`"a b"`,
//! spaces kept) or bare (`abc`). In both, `\DDD` is the octet with decimal value DDD and `\X`
//! is X itself (`\"`, `\\`, `\ `).

/// Longest character-string on the wire (RFC 1035 §3.3: one length octet).
pub const MAX_STRING: usize = 255;

/// The tokens of `text`, escapes decoded, as octets.
pub fn tokens(text: &str) -> Result<Vec<Vec<u8>>, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b' ' | b'\t' => i += 1,
            b'"' => {
                let mut token = Vec::new();
                i += 1;
                loop {
                    match bytes.get(i) {
                        None => return Err("a quoted string is not closed with `\"`".into()),
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') => i = escape(bytes, i, &mut token)?,
                        Some(&b) => {
                            check_plain(b)?;
                            token.push(b);
                            i += 1;
                        }
                    }
                }
                if let Some(&b) = bytes.get(i)
                    && !matches!(b, b' ' | b'\t')
                {
                    return Err(format!(
                        "`{}` follows a closing quote; put a space between strings",
                        char::from(b)
                    ));
                }
                out.push(token);
            }
            _ => {
                let mut token = Vec::new();
                while let Some(&b) = bytes.get(i) {
                    match b {
                        b' ' | b'\t' => break,
                        b'\\' => i = escape(bytes, i, &mut token)?,
                        b'"' | b'(' | b')' | b';' => {
                            return Err(format!(
                                "`{}` inside an unquoted string; quote the string (\"...\") or \
                                 escape it (\\{})",
                                char::from(b),
                                char::from(b)
                            ));
                        }
                        _ => {
                            check_plain(b)?;
                            token.push(b);
                            i += 1;
                        }
                    }
                }
                out.push(token);
            }
        }
    }
    Ok(out)
}

/// Control characters must be written as `\DDD`: a raw newline in a value is a mistake.
fn check_plain(b: u8) -> Result<(), String> {
    if b < 0x20 || b == 0x7f {
        return Err(format!(
            "a control character (code {b}) must be written as \\{b:03}"
        ));
    }
    Ok(())
}

/// Decodes the escape starting at `bytes[i]` (a backslash) into `out`; returns where it ends.
fn escape(bytes: &[u8], i: usize, out: &mut Vec<u8>) -> Result<usize, String> {
    let Some(&first) = bytes.get(i + 1) else {
        return Err("a value ends with a lone `\\`; write `\\\\` for a backslash".into());
    };
    if !first.is_ascii_digit() {
        // `\X`: X itself, which may be a character of several octets.
        let len = utf8_len(first);
        let end = (i + 1 + len).min(bytes.len());
        out.extend_from_slice(&bytes[i + 1..end]);
        return Ok(end);
    }
    let digits = bytes
        .get(i + 1..i + 4)
        .filter(|d| d.iter().all(u8::is_ascii_digit))
        .ok_or("`\\` followed by a digit needs exactly three digits (\\DDD, 000-255)")?;
    let value = digits
        .iter()
        .fold(0u32, |v, d| v * 10 + u32::from(d - b'0'));
    let octet = u8::try_from(value).map_err(|_| format!("`\\{value}` is over 255"))?;
    out.push(octet);
    Ok(i + 4)
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

/// The character-strings of a TXT value. A string longer than 255 octets is split into strings
/// of 255 (as large DNS providers do): readers of TXT join a record's strings.
pub fn txt_strings(text: &str) -> Result<Vec<Vec<u8>>, String> {
    let tokens = tokens(text)?;
    if tokens.is_empty() {
        return Err("a TXT value needs at least one string, e.g. \"hello\"".into());
    }
    let mut out = Vec::with_capacity(tokens.len());
    for token in tokens {
        if token.len() <= MAX_STRING {
            out.push(token);
        } else {
            out.extend(token.chunks(MAX_STRING).map(<[u8]>::to_vec));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Vec<Vec<u8>> {
        tokens(s).unwrap()
    }

    #[test]
    fn escapes_decode_as_rfc_1035_says() {
        assert_eq!(t(r#""caf\195\169""#), vec!["café".as_bytes().to_vec()]);
        assert_eq!(t(r#""say \"hi\"""#), vec![b"say \"hi\"".to_vec()]);
        assert_eq!(t(r#""back\\slash""#), vec![b"back\\slash".to_vec()]);
        assert_eq!(t(r#"a\ b"#), vec![b"a b".to_vec()]);
        assert_eq!(t(r#""\000\255""#), vec![vec![0, 255]]);
        assert_eq!(t(r#""\é""#), vec!["é".as_bytes().to_vec()]);
        assert_eq!(t("\"é\""), vec!["é".as_bytes().to_vec()]);
    }

    #[test]
    fn spaces_split_bare_words_and_stay_in_quotes() {
        assert_eq!(
            t("a b\tc"),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        assert_eq!(t(r#""a b" c"#), vec![b"a b".to_vec(), b"c".to_vec()]);
        assert_eq!(t(r#""" """#), vec![Vec::<u8>::new(), Vec::new()]);
        assert_eq!(t("  "), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn malformed_values_are_refused_with_a_reason() {
        for bad in [
            r#""open"#,
            r#"end\"#,
            r#""\25""#,
            r#""\256""#,
            r#""a"b"#,
            r#"a"b""#,
            "semi;colon",
            "(paren",
            "new\nline",
        ] {
            assert!(tokens(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn long_txt_strings_are_split_at_255() {
        let long = "x".repeat(600);
        let strings = txt_strings(&format!("\"{long}\"")).unwrap();
        assert_eq!(
            strings.iter().map(Vec::len).collect::<Vec<_>>(),
            [255, 255, 90]
        );
        assert!(txt_strings("").is_err());
    }
}
