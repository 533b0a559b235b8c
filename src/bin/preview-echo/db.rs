//! The DATABASE_URL mode: lets a test tell which database a pod uses.
//! `/db/write?table=T` inserts one row into T (every column its default),
//! `/db/count` counts the rows of every table (PostgreSQL: of schema
//! `public`; MySQL: of the URL's database). `postgres://` and `mysql://`
//! URLs. A connection per request: this is a test app, not a pool.

use hyper::StatusCode;
use serde_json::{Value, json};

pub async fn handle(url: Option<&str>, what: &str, query: &str) -> (StatusCode, Value) {
    let Some(url) = url else {
        return (StatusCode::NOT_FOUND, json!({"error": "DATABASE_URL is not set"}));
    };
    match run(url, what, query).await {
        Ok(v) => (StatusCode::OK, v),
        Err((status, e)) => (status, json!({"error": e})),
    }
}

/// `?table=T`, a plain lowercase name.
fn table(query: &str) -> Result<&str, (StatusCode, String)> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("table="))
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
        .ok_or((StatusCode::BAD_REQUEST, "table: expected ?table=<lowercase name>".to_string()))
}

async fn run(url: &str, what: &str, query: &str) -> Result<Value, (StatusCode, String)> {
    if url.starts_with("mysql://") {
        return run_mysql(url, what, query).await;
    }
    let unavailable = |e: tokio_postgres::Error| {
        let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
        (StatusCode::SERVICE_UNAVAILABLE, msg)
    };
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(unavailable)?;
    tokio::spawn(conn);
    match what {
        "write" => {
            let table = table(query)?;
            client.execute(&format!("INSERT INTO \"{table}\" DEFAULT VALUES"), &[]).await.map_err(unavailable)?;
            Ok(json!({"wrote": table}))
        }
        "count" => {
            let tables = client
                .query("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1", &[])
                .await
                .map_err(unavailable)?;
            let mut out = serde_json::Map::new();
            for t in tables {
                let name: String = t.get(0);
                let n: i64 = client
                    .query_one(&format!("SELECT count(*) FROM \"{}\"", name.replace('"', "\"\"")), &[])
                    .await
                    .map_err(unavailable)?
                    .get(0);
                out.insert(name, json!(n));
            }
            Ok(
                json!({"database": client.query_one("SELECT current_database()", &[]).await.map_err(unavailable)?.get::<_, String>(0), "rows": out}),
            )
        }
        _ => Err((StatusCode::NOT_FOUND, "expected /db/write?table=T or /db/count".into())),
    }
}

async fn run_mysql(url: &str, what: &str, query: &str) -> Result<Value, (StatusCode, String)> {
    use mysql_async::prelude::Queryable;
    let unavailable = |e: mysql_async::Error| (StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    let opts = mysql_async::Opts::from_url(url).map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let mut c = mysql_async::Conn::new(opts).await.map_err(unavailable)?;
    let out = match what {
        "write" => {
            let table = table(query)?;
            c.query_drop(format!("INSERT INTO `{table}` () VALUES ()")).await.map_err(unavailable)?;
            json!({"wrote": table})
        }
        "count" => {
            let tables: Vec<String> = c
                .query(
                    "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() \
                     AND TABLE_TYPE = 'BASE TABLE' ORDER BY 1",
                )
                .await
                .map_err(unavailable)?;
            let mut rows = serde_json::Map::new();
            for t in tables {
                let n: Option<i64> = c
                    .query_first(format!("SELECT COUNT(*) FROM `{}`", t.replace('`', "``")))
                    .await
                    .map_err(unavailable)?;
                rows.insert(t, json!(n.unwrap_or(0)));
            }
            let db: Option<String> = c.query_first("SELECT DATABASE()").await.map_err(unavailable)?;
            json!({"database": db, "rows": rows})
        }
        _ => return Err((StatusCode::NOT_FOUND, "expected /db/write?table=T or /db/count".into())),
    };
    let _ = c.disconnect().await;
    Ok(out)
}
