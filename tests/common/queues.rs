//! SQS (ElasticMQ) and RabbitMQ on the node address (deploy/local/queues.sh),
//! as the queue tests and the queue benchmark use them: make and delete
//! queues, send numbered messages with headers, and read back the records
//! preview-echo's consumers write (`<by> <pod> <n> <id>`).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use anyhow::{Context, Result, ensure};
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use preview::previewd::queues::sqs;

pub const SQS_ENDPOINT: &str = "http://198.18.255.254:9324";
pub const AMQP_URL: &str = "amqp://staging:staging-pw@198.18.255.254:5672/%2f";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broker {
    Sqs,
    Rmq,
}

/// One consumption: who (`staging` or a key), which pod, its count there.
#[derive(Clone, Debug)]
pub struct Consumed {
    pub by: String,
    pub pod: String,
    pub n: u64,
}

pub struct Queues {
    pub broker: Broker,
    pub sqs: aws_sdk_sqs::Client,
    amqp: Option<Connection>,
    /// Every record read so far, by message id (reading takes them off the queue).
    pub seen: BTreeMap<u32, Vec<Consumed>>,
}

impl Queues {
    pub async fn new(broker: Broker) -> Result<Queues> {
        let amqp = match broker {
            Broker::Rmq => Some(Connection::connect(AMQP_URL, ConnectionProperties::default()).await?),
            Broker::Sqs => None,
        };
        Ok(Queues { broker, sqs: sqs::client(SQS_ENDPOINT, ""), amqp, seen: BTreeMap::new() })
    }

    fn amqp(&self) -> &Connection {
        // new() connects for RabbitMQ; SQS never calls this.
        self.amqp.as_ref().expect("a RabbitMQ connection")
    }

    /// The pod env that makes preview-echo consume `queue` and record into `record`.
    pub fn consumer_env(&self, queue: &str, record: &str, endpoint: Option<&str>) -> Vec<(&'static str, String)> {
        match self.broker {
            Broker::Sqs => vec![
                ("SQS_QUEUE", queue.into()),
                ("SQS_ENDPOINT", endpoint.unwrap_or(SQS_ENDPOINT).into()),
                ("SQS_RECORD_QUEUE", record.into()),
            ],
            Broker::Rmq => vec![
                ("AMQP_QUEUE", queue.into()),
                ("AMQP_URL", endpoint.unwrap_or(AMQP_URL).into()),
                ("AMQP_RECORD_QUEUE", record.into()),
            ],
        }
    }

    /// The QueueSplit entry that declares the consumer above.
    pub fn declaration(&self) -> serde_json::Value {
        match self.broker {
            Broker::Sqs => serde_json::json!({"id": "orders", "type": "SQS",
                "brokers": {"fromEnv": "SQS_ENDPOINT"}, "queueEnv": "SQS_QUEUE"}),
            Broker::Rmq => serde_json::json!({"id": "orders", "type": "RMQ",
                "brokers": {"fromEnv": "AMQP_URL"}, "queueEnv": "AMQP_QUEUE"}),
        }
    }

    pub fn queue_type(&self) -> &'static str {
        match self.broker {
            Broker::Sqs => "SQS",
            Broker::Rmq => "RMQ",
        }
    }

    pub fn queue_var(&self) -> &'static str {
        match self.broker {
            Broker::Sqs => "SQS_QUEUE",
            Broker::Rmq => "AMQP_QUEUE",
        }
    }

    /// Makes a queue (SQS: with `attrs`).
    pub async fn create(&self, name: &str, attrs: &[(QueueAttributeName, &str)]) -> Result<()> {
        match self.broker {
            Broker::Sqs => {
                let a: HashMap<_, _> = attrs.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
                self.sqs.create_queue().queue_name(name).set_attributes(Some(a)).send().await?;
            }
            Broker::Rmq => {
                let ch = self.amqp().create_channel().await?;
                ch.queue_declare(name.into(), QueueDeclareOptions::durable(), FieldTable::default()).await?;
            }
        }
        Ok(())
    }

    /// Whether queue `name` exists.
    pub async fn exists(&self, name: &str) -> Result<bool> {
        Ok(match self.broker {
            Broker::Sqs => self.sqs.get_queue_url().queue_name(name).send().await.is_ok(),
            Broker::Rmq => {
                let ch = self.amqp().create_channel().await?;
                let passive = QueueDeclareOptions { passive: true, ..Default::default() };
                ch.queue_declare(name.into(), passive, FieldTable::default()).await.is_ok()
            }
        })
    }

    pub async fn delete(&self, names: &[&str]) -> Result<()> {
        match self.broker {
            Broker::Sqs => preview::previewd::queues::sqs::delete(SQS_ENDPOINT, "", names).await?,
            Broker::Rmq => preview::previewd::queues::rmq::delete(AMQP_URL, names).await?,
        }
        Ok(())
    }

    /// Sends messages `ids` to `queue`: each with an `id` attribute/header,
    /// `headers(i)` besides, and on a FIFO queue the group `group(i)`.
    pub async fn send(
        &self,
        queue: &str,
        ids: Range<u32>,
        headers: impl Fn(u32) -> Vec<(&'static str, String)>,
        group: Option<&dyn Fn(u32) -> String>,
    ) -> Result<()> {
        match self.broker {
            Broker::Sqs => {
                let url = self.sqs.get_queue_url().queue_name(queue).send().await?.queue_url.context("url")?;
                let ids: Vec<u32> = ids.collect();
                for chunk in ids.chunks(10) {
                    let mut entries = Vec::new();
                    for &i in chunk {
                        let mut attrs = HashMap::new();
                        for (k, v) in std::iter::once(("id", i.to_string())).chain(headers(i)) {
                            attrs.insert(
                                k.to_string(),
                                MessageAttributeValue::builder().data_type("String").string_value(v).build()?,
                            );
                        }
                        let mut e = SendMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .message_body(format!("message {i}"))
                            .set_message_attributes(Some(attrs));
                        if let Some(g) = group {
                            e = e.message_group_id(g(i)).message_deduplication_id(format!("m-{i}"));
                        }
                        entries.push(e.build()?);
                    }
                    let out = self.sqs.send_message_batch().queue_url(&url).set_entries(Some(entries)).send().await?;
                    ensure!(out.failed.is_empty(), "sends refused: {:?}", out.failed);
                }
            }
            Broker::Rmq => {
                let ch = self.amqp().create_channel().await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                for i in ids {
                    let mut h = FieldTable::default();
                    for (k, v) in std::iter::once(("id", i.to_string())).chain(headers(i)) {
                        h.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
                    }
                    let props = BasicProperties::default().with_headers(h).with_delivery_mode(2);
                    let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
                    // Confirmed all at once below.
                    drop(
                        ch.basic_publish("".into(), queue.into(), opts, format!("message {i}").as_bytes(), props)
                            .await?,
                    );
                }
                let returned = ch.wait_for_confirms().await?;
                ensure!(returned.is_empty(), "{} messages returned unroutable", returned.len());
            }
        }
        Ok(())
    }

    /// Reads (and takes off) every record in `record`, into `seen`.
    pub async fn collect(&mut self, record: &str) -> Result<()> {
        let mut bodies = Vec::new();
        match self.broker {
            Broker::Sqs => {
                let url = self.sqs.get_queue_url().queue_name(record).send().await?.queue_url.context("url")?;
                loop {
                    let got = self.sqs.receive_message().queue_url(&url).max_number_of_messages(10).send().await?;
                    let msgs = got.messages.unwrap_or_default();
                    if msgs.is_empty() {
                        break;
                    }
                    for m in msgs {
                        bodies.push(m.body.clone().unwrap_or_default());
                        let handle = m.receipt_handle.unwrap_or_default();
                        self.sqs.delete_message().queue_url(&url).receipt_handle(handle).send().await?;
                    }
                }
            }
            Broker::Rmq => {
                let ch = self.amqp().create_channel().await?;
                let opts = BasicGetOptions { no_ack: true };
                while let Some(m) = ch.basic_get(record.into(), opts).await? {
                    bodies.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
                }
            }
        }
        for b in bodies {
            let parts: Vec<&str> = b.split(' ').collect();
            ensure!(parts.len() == 4, "a record that is not `by pod n id`: {b:?}");
            let id: u32 = parts[3].parse().with_context(|| format!("record {b:?}"))?;
            let c = Consumed { by: parts[0].into(), pod: parts[1].into(), n: parts[2].parse()? };
            self.seen.entry(id).or_default().push(c);
        }
        Ok(())
    }

    /// Waits until every id of `ids` has been consumed.
    pub async fn wait_for(&mut self, record: &str, ids: Range<u32>, within: std::time::Duration) -> Result<()> {
        let until = std::time::Instant::now() + within;
        loop {
            self.collect(record).await?;
            let missing = ids.clone().filter(|i| !self.seen.contains_key(i)).count();
            if missing == 0 {
                return Ok(());
            }
            ensure!(
                std::time::Instant::now() < until,
                "{missing} of {} messages not consumed in {within:?}",
                ids.len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }

    /// Checks that each of `ids` was consumed only by `who(id)`; returns how
    /// many were consumed more than once (duplicates).
    pub fn check(&self, ids: Range<u32>, who: impl Fn(u32) -> &'static str) -> Result<usize> {
        let mut wrong = Vec::new();
        let mut dups = 0;
        for i in ids.clone() {
            let by = self.seen.get(&i).map(|v| v.iter().map(|c| c.by.as_str()).collect::<Vec<_>>()).unwrap_or_default();
            if by.is_empty() || by.iter().any(|b| *b != who(i)) {
                wrong.push(format!("{i}: {by:?} (want {:?})", who(i)));
            }
            dups += by.len().saturating_sub(1);
        }
        ensure!(
            wrong.is_empty(),
            "{} of {} messages lost or consumed by the wrong consumer: {:?}",
            wrong.len(),
            ids.len(),
            &wrong[..wrong.len().min(10)]
        );
        Ok(dups)
    }
}
