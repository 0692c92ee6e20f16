//! Memory sizes on the command line: `64M`, `1G`, `512MiB`, `1073741824`.

/// Parses a size with an optional binary suffix (K, M, G, T; `iB`/`B` accepted).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("`{s}` is not a size (examples: 64M, 1G, 512MiB, 1048576)"));
    }
    let n: u64 = num.parse().map_err(|_| format!("`{s}`: number too large"))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("`{s}`: unknown size suffix `{suffix}` (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("`{s}`: size too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").unwrap_err().contains("unknown size suffix `Q`"));
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
