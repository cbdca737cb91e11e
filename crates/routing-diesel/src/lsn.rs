//! Typed WAL positions with diesel's [`PgLsn`].

use diesel::QueryableByName;
use diesel::pg::data_types::PgLsn;
use diesel::sql_types::{Nullable, PgLsn as PgLsnSql};
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

async fn lsn_query(conn: &mut AsyncPgConnection, sql: &str) -> diesel::QueryResult<Option<Lsn>> {
    let row = diesel::sql_query(sql).get_result::<LsnRow>(conn).await?;
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
