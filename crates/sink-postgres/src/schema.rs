//! The table the sink writes: created when asked, and checked at every
//! connection for the columns and the privilege the sink needs, so that a
//! mistake is reported once, by name, rather than as every batch failing.

use tokio_postgres::Client;

use crate::encode::{COLUMNS, LabelsType};

/// The table as the sink writes it, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The table's name as PostgreSQL prints it (quoted where need be,
    /// schema-qualified unless on the search path): safe in SQL.
    pub table: String,
    /// What the `labels` column holds.
    pub labels: LabelsType,
}

/// Why the table cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The table is not as the sink needs it: a mistake to fix, not retried.
    #[error("{0}")]
    Unfit(String),
    /// The database failed to answer.
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
}

/// The statement `create_table = true` runs.
pub fn create_statement(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (\n  \
           sensor_name         text             NOT NULL,\n  \
           labels              jsonb            NOT NULL DEFAULT '{{}}',\n  \
           sensor_value        bigint,\n  \
           sensor_value_float  double precision,\n  \
           created_at          timestamptz,\n  \
           received_at         timestamptz      NOT NULL\n)"
    )
}

/// The types each column may have: those whose binary form the sink writes.
fn accepted(column: &str) -> &'static [&'static str] {
    match column {
        "sensor_name" => &["text", "varchar"],
        "labels" => &["jsonb", "json"],
        "sensor_value" => &["int8"],
        "sensor_value_float" => &["float8"],
        _ => &["timestamptz"],
    }
}

/// Creates the table if asked and it is missing, then checks it.
pub async fn prepare(client: &Client, table: &str, create: bool) -> Result<Target, SchemaError> {
    if create {
        client.batch_execute(&create_statement(table)).await?;
    }
    let found: Option<String> = client
        .query_one("SELECT to_regclass($1)::text", &[&table])
        .await?
        .get(0);
    let Some(name) = found else {
        return Err(SchemaError::Unfit(format!(
            "table `{table}` does not exist in database `{}` (create it as docs/stages/postgres.md shows, or set `create_table = true`)",
            database(client).await
        )));
    };
    let rows = client
        .query(
            "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, a.atttypmod),
                    a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&table],
        )
        .await?;
    let mut labels = LabelsType::Jsonb;
    for column in COLUMNS {
        let Some(row) = rows.iter().find(|row| row.get::<_, String>(0) == column) else {
            return Err(SchemaError::Unfit(format!(
                "table `{name}` has no column `{column}` (docs/stages/postgres.md lists the columns the sink writes)"
            )));
        };
        let type_name: String = row.get(1);
        if !accepted(column).contains(&type_name.as_str()) {
            let shown: String = row.get(2);
            return Err(SchemaError::Unfit(format!(
                "table `{name}`, column `{column}`: type `{shown}` cannot take what the sink writes (expected {})",
                accepted(column).join(" or ")
            )));
        }
        if column == "labels" && type_name == "json" {
            labels = LabelsType::Json;
        }
    }
    if let Some(row) = rows
        .iter()
        .find(|row| row.get::<_, bool>(3) && !COLUMNS.contains(&row.get::<_, String>(0).as_str()))
    {
        return Err(SchemaError::Unfit(format!(
            "table `{name}`, column `{}`: NOT NULL without a default, and the sink does not write it",
            row.get::<_, String>(0)
        )));
    }
    let may_insert: bool = client
        .query_one(
            "SELECT has_table_privilege(to_regclass($1), 'INSERT')",
            &[&table],
        )
        .await?
        .get(0);
    if !may_insert {
        let user: String = client
            .query_one("SELECT current_user::text", &[])
            .await?
            .get(0);
        return Err(SchemaError::Unfit(format!(
            "user `{user}` may not insert into table `{name}` (GRANT INSERT ON {name} TO {user})"
        )));
    }
    Ok(Target {
        table: name,
        labels,
    })
}

async fn database(client: &Client) -> String {
    match client
        .query_one("SELECT current_database()::text", &[])
        .await
    {
        Ok(row) => row.get(0),
        Err(_) => "?".into(),
    }
}
