//! The DATABASE_URL mode: lets a test tell which database a pod uses.
//! `/db/write?table=T` inserts one row into T (every column its default),
//! `/db/count` counts the rows of every table of schema `public`. A
//! connection per request: this is a test app, not a pool.

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

async fn run(url: &str, what: &str, query: &str) -> Result<Value, (StatusCode, String)> {
    let unavailable = |e: tokio_postgres::Error| {
        let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
        (StatusCode::SERVICE_UNAVAILABLE, msg)
    };
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(unavailable)?;
    tokio::spawn(conn);
    match what {
        "write" => {
            let table = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("table="))
                .filter(|t| {
                    !t.is_empty() && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                })
                .ok_or((StatusCode::BAD_REQUEST, "table: expected ?table=<lowercase name>".to_string()))?;
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
