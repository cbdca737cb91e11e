//! Typed WAL positions with diesel's [`PgLsn`].

use diesel::QueryableByName;
use diesel::pg::data_types::PgLsn;
use diesel::sql_types::{Nullable, PgLsn as PgLsnSql};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use routing_core::Lsn;

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

async fn lsn_query(conn: &mut AsyncPgConnection, sql: &str) -> diesel::QueryResult<Option<Lsn>> {
    let row = diesel::sql_query(sql).get_result::<LsnRow>(conn).await?;
    Ok(row.v.map(from_pg_lsn))
}

/// The session's current WAL position (`pg_current_wal_lsn()`, read as a binary `pg_lsn`).
/// Run right after a COMMIT on the primary it is the commit LSN a replica must replay to show
/// that commit; this is what [`routing_core::WriteConn::finish`] records for this backend.
pub async fn current_wal_lsn(conn: &mut AsyncPgConnection) -> diesel::QueryResult<Lsn> {
    lsn_query(conn, "SELECT pg_catalog.pg_current_wal_lsn() AS v")
        .await?
        .ok_or(diesel::result::Error::NotFound)
}

/// A replica's replay position (`pg_last_wal_replay_lsn()`); `None` on a primary.
pub async fn replay_lsn(conn: &mut AsyncPgConnection) -> diesel::QueryResult<Option<Lsn>> {
    lsn_query(conn, "SELECT pg_catalog.pg_last_wal_replay_lsn() AS v").await
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
