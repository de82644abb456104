//! Values written into statement text, for the batch writes.
//!
//! A multi-row `INSERT` with `?` placeholders has a different text for
//! every row count, so `mysql_async`'s statement cache never hits: each
//! group commit paid a prepare round trip and the decoding of one column
//! definition per placeholder (14,000 for a batch of 1,000), ~30% of the
//! hub's CPU during ingest (docs/perf/hub-ingest.txt). Sent over the text
//! protocol instead, the statement is one round trip with nothing to
//! decode but the OK packet.
//!
//! The quoting is `mysql_common`'s own ([`Value::as_sql`]), never ours; the
//! one thing it needs to know is whether the session runs with
//! `NO_BACKSLASH_ESCAPES`, which the server states in every OK packet.
use mysql_async::{Conn, Value, consts::StatusFlags};

/// Whether the session of `conn` treats `\` as an ordinary character
/// (`sql_mode` has `NO_BACKSLASH_ESCAPES`), as the status flags of its last
/// OK packet say; `None` before any statement answered with one.
pub(super) fn no_backslash_escapes(conn: &Conn) -> Option<bool> {
    conn.last_ok_packet().map(|ok| {
        ok.status_flags()
            .contains(StatusFlags::SERVER_STATUS_NO_BACKSLASH_ESCAPES)
    })
}

/// `values` as the `VALUES` list of a multi-row statement, `width` to a
/// row: `(v1, v2),(v3, v4)`, each value quoted for a session whose
/// `NO_BACKSLASH_ESCAPES` is `no_backslash_escapes`.
pub(super) fn rows(values: &[Value], width: usize, no_backslash_escapes: bool) -> String {
    debug_assert!(width > 0 && values.len().is_multiple_of(width));
    let mut out = String::with_capacity(values.len() * 12);
    for (n, row) in values.chunks(width).enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push('(');
        for (k, v) in row.iter().enumerate() {
            if k > 0 {
                out.push_str(", ");
            }
            out.push_str(&v.as_sql(no_backslash_escapes));
        }
        out.push(')');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_grouped_and_quoted_for_the_mode() {
        let values: Vec<Value> = vec![1u64.into(), "it's a\\b".into(), Value::NULL, (-2i64).into()];
        assert_eq!(
            rows(&values, 2, false),
            r"(1, 'it\'s a\\b'),(NULL, -2)",
            "backslash escapes"
        );
        assert_eq!(
            rows(&values, 2, true),
            r"(1, 'it''s a\b'),(NULL, -2)",
            "NO_BACKSLASH_ESCAPES: quotes doubled, backslash as is"
        );
        assert_eq!(rows(&[], 3, false), "");
    }
}
