//! Typed WAL positions with diesel's [`PgLsn`].

use diesel::QueryableByName;
use diesel::pg::Pg;
use diesel::pg::data_types::PgLsn;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Nullable, PgLsn as PgLsnSql, Untyped};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use routing_core::{Lsn, sql};

/// diesel's `pg_lsn` value as routing-core's [`Lsn`].
pub fn from_pg_lsn(lsn: PgLsn) -> Lsn {
    Lsn(lsn.0)
}

/// routing-core's [`Lsn`] as diesel's `pg_lsn` value (for binding in queries).
pub fn to_pg_lsn(lsn: Lsn) -> PgLsn {
    PgLsn(lsn.0)
}

#[derive(QueryableByName)]
struct LsnRow {
    #[diesel(sql_type = Nullable<PgLsnSql>)]
    v: Option<PgLsn>,
}

/// One of the router's own statements (constant SQL, no binds), run as a prepared statement
/// that diesel-async caches by its text: one round trip after its first use, where
/// `diesel::sql_query` (never cached) prepares, runs and closes a statement every time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Static(&'static str);

impl Static {
    /// The router's statements that run on request paths; `None` for any other SQL (caching
    /// arbitrary texts would grow the connection's statement cache without bound).
    pub(crate) fn of(text: &str) -> Option<Static> {
        [
            sql::READ_ONLY_CHECK,
            sql::WRITER_CHECK,
            sql::PING,
            sql::COMMIT_LSN,
            sql::COMMIT_LSN_TYPED,
            sql::REPLAY_LSN,
            sql::REPLAY_LSN_TYPED,
        ]
        .into_iter()
        .find(|s| *s == text)
        .map(Static)
    }
}

impl QueryId for Static {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for Static {
    type SqlType = Untyped;
}

impl QueryFragment<Pg> for Static {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> diesel::QueryResult<()> {
        out.push_sql(self.0);
        Ok(())
    }
}

async fn lsn_query(
    conn: &mut AsyncPgConnection,
    sql: &'static str,
) -> diesel::QueryResult<Option<Lsn>> {
    let row = Static(sql).get_result::<LsnRow>(conn).await?;
    Ok(row.v.map(from_pg_lsn))
}

/// [`commit_lsn`] through a shared reference, so it can be pipelined behind a COMMIT.
pub(crate) async fn commit_lsn_shared(
    conn: &AsyncPgConnection,
) -> diesel::QueryResult<Option<Lsn>> {
    let mut shared = conn;
    let row = Static(sql::COMMIT_LSN_TYPED)
        .get_result::<LsnRow>(&mut shared)
        .await?;
    Ok(row.v.map(from_pg_lsn))
}

/// The WAL position that covers the session's last commit ([`routing_core::sql::COMMIT_LSN`],
/// read as a binary `pg_lsn`): run right after a COMMIT on the primary, the LSN a replica must
/// replay to show that commit; this is what [`routing_core::WriteConn::finish`] records for this
/// backend. `None` while a transaction that wrote is still open.
pub async fn commit_lsn(conn: &mut AsyncPgConnection) -> diesel::QueryResult<Option<Lsn>> {
    lsn_query(conn, sql::COMMIT_LSN_TYPED).await
}

/// A replica's replay position (`pg_last_wal_replay_lsn()`); `None` on a primary.
pub async fn replay_lsn(conn: &mut AsyncPgConnection) -> diesel::QueryResult<Option<Lsn>> {
    lsn_query(conn, sql::REPLAY_LSN_TYPED).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_both_ways() {
        let lsn: Lsn = "16/B374D848".parse().expect("lsn");
        assert_eq!(from_pg_lsn(to_pg_lsn(lsn)), lsn);
        assert_eq!(to_pg_lsn(lsn).0, 0x16_B374_D848);
    }
}
