//! Float values and labels through the real binary: what a client sends over
//! gRPC comes out of json_file and stdout exact, what a reading cannot hold is
//! refused naming the item, and the original's requests read as they always did.

use std::collections::BTreeMap;

use sink_e2e::*;
use sink_proto::sensor_value::Measurement;
use sink_proto::{SensorValue, SensorValuesRequest};

const CREATED: prost_types::Timestamp = prost_types::Timestamp {
    seconds: 1_795_860_000,
    nanos: 512_000_000,
};

fn item(name: &str, int: Option<i64>, float: Option<f64>, labels: &[(&str, &str)]) -> SensorValue {
    SensorValue {
        sensor_name: name.into(),
        measurement: Some(Measurement {
            sensor_value: int,
            created_at: Some(CREATED),
            sensor_value_float: float,
        }),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// `line` with its `received_at` value replaced by `…`, which the test cannot know.
fn without_received_at(line: &str) -> String {
    let at = line.find(r#""received_at":""#).expect("received_at") + 15;
    let end = at + line[at..].find('"').expect("closing quote");
    format!("{}…{}", &line[..at], &line[end..])
}

/// The text of `sensor_value` in a value line, as written.
fn value_text(line: &str) -> &str {
    let at = line.find(r#""sensor_value":"#).expect("sensor_value") + 15;
    let end = at + line[at..].find(',').expect("comma after the value");
    &line[at..end]
}

/// Floats of every kind a client may send: each comes back bit for bit.
/// (Not -0.0: prost, like other proto3 encoders, leaves a wrapper's zero out,
/// and the sink then reads 0.0 as protobuf says.)
const FLOATS: [f64; 9] = [
    21.5,
    3.0,
    0.1,
    1e21,
    -2.5,
    f64::MIN_POSITIVE,
    5e-324,
    f64::MAX,
    -123_456.789_012_345_6,
];

#[tokio::test]
async fn floats_labels_and_integers_come_out_of_both_sinks_exact() {
    let pipeline = [
        grpc("sensors", ""),
        json_file("file", &["sensors"], "out.json", ""),
        stdout_sink("console", &["sensors"], ""),
        json_file(
            "batches",
            &["sensors"],
            "batches.json",
            "layout = \"batch\"",
        ),
    ]
    .concat();
    let mut sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    let mut items = vec![
        item("int", Some(42), None, &[]),
        item("none", None, None, &[]),
        item(
            "labelled",
            None,
            Some(21.5),
            &[("unit", "C"), ("site", "a"), ("quote\"", "tab\t")],
        ),
    ];
    items.extend(
        FLOATS
            .iter()
            .enumerate()
            .map(|(i, &f)| item(&format!("float-{i}"), None, Some(f), &[])),
    );
    client
        .send_sensor_values(SensorValuesRequest {
            items: items.clone(),
        })
        .await
        .expect("accepted");
    sink.stop();

    let text = std::fs::read_to_string(sink.path("out.json")).expect("written");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), items.len(), "{text}");
    let created = r#""created_at":"2026-11-28T10:00:00.512Z""#;
    assert_eq!(
        without_received_at(lines[0]),
        format!(r#"{{"sensor_name":"int","sensor_value":42,{created},"received_at":"…"}}"#)
    );
    assert_eq!(
        without_received_at(lines[1]),
        format!(r#"{{"sensor_name":"none","sensor_value":null,{created},"received_at":"…"}}"#)
    );
    assert_eq!(
        without_received_at(lines[2]),
        format!(
            r#"{{"sensor_name":"labelled","labels":{{"quote\"":"tab\t","site":"a","unit":"C"}},"sensor_value":21.5,{created},"received_at":"…"}}"#
        )
    );
    let expected_text = [
        "21.5",
        "3.0",
        "0.1",
        "1e21",
        "-2.5",
        "2.2250738585072014e-308",
        "5e-324",
        "1.7976931348623157e308",
        "-123456.7890123456",
    ];
    for (i, float) in FLOATS.iter().enumerate() {
        let line = lines[3 + i];
        let written = value_text(line);
        assert_eq!(written, expected_text[i], "{line}");
        let back: f64 = written.parse().expect("a number");
        assert_eq!(back.to_bits(), float.to_bits(), "{line}");
        // And a JSON reader sees a float, not an integer.
        let value: serde_json::Value = serde_json::from_str(line).expect("JSON");
        assert!(value["sensor_value"].is_f64(), "{line}");
    }

    // stdout writes the same lines.
    let stdout = sink.stdout_lines();
    let strip = |lines: &[&str]| {
        lines
            .iter()
            .map(|l| without_received_at(l))
            .collect::<Vec<_>>()
    };
    let stdout: Vec<&str> = stdout.iter().map(String::as_str).collect();
    assert_eq!(strip(&stdout), strip(&lines));

    // The original's batch line holds the same objects in `values`.
    let batches = json_lines(&sink.path("batches.json"));
    assert_eq!(batches.len(), 1);
    let values = batches[0]["values"].as_array().expect("values");
    assert_eq!(values.len(), items.len());
    assert_eq!(values[2]["labels"]["site"], "a");
    assert_eq!(values[2]["sensor_value"], 21.5);
    assert!(values[0].get("labels").is_none(), "no labels, no key");
}

/// Sends one call of a good item and `bad`; returns the status message after
/// checking the code.
async fn refused(
    client: &mut sink_proto::sensor_service_client::SensorServiceClient<tonic::transport::Channel>,
    bad: SensorValue,
) -> String {
    let status = client
        .send_sensor_values(SensorValuesRequest {
            items: vec![item("good", Some(1), None, &[]), bad],
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status.message().to_owned()
}

#[tokio::test]
async fn what_a_reading_cannot_hold_is_refused_naming_the_item_and_the_bound() {
    let pipeline = [
        grpc(
            "sensors",
            "limits = { max_labels = 3, max_name_bytes = 10 }",
        ),
        json_file("file", &["sensors"], "out.json", ""),
    ]
    .concat();
    let mut sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;

    let both = refused(&mut client, item("t", Some(1), Some(1.0), &[])).await;
    assert_eq!(
        both,
        "items[1].measurement has both sensor_value and sensor_value_float; send one"
    );
    for (bad, shown) in [
        (f64::NAN, "NaN"),
        (f64::INFINITY, "inf"),
        (f64::NEG_INFINITY, "-inf"),
    ] {
        let message = refused(&mut client, item("t", None, Some(bad), &[])).await;
        assert!(
            message.starts_with(&format!(
                "items[1].measurement.sensor_value_float is {shown}"
            )),
            "{message}"
        );
    }
    let empty_key = refused(&mut client, item("t", None, Some(1.0), &[("", "x")])).await;
    assert_eq!(empty_key, "items[1]: a label key is empty");
    let four = [("a", ""), ("b", ""), ("c", ""), ("d", "")];
    let many = refused(&mut client, item("t", None, None, &four)).await;
    assert_eq!(many, "items[1]: 4 labels, over max_labels (3)");
    let long_name = refused(&mut client, item("eleven-byte", None, None, &[])).await;
    assert!(long_name.contains("max_name_bytes (10)"), "{long_name}");
    let key = "k".repeat(129);
    let long_key = refused(&mut client, item("t", None, None, &[(&key, "v")])).await;
    assert!(long_key.contains("max_label_key_bytes (128)"), "{long_key}");
    let value = "v".repeat(1025);
    let long_value = refused(&mut client, item("t", None, None, &[("k", &value)])).await;
    assert!(
        long_value.contains("max_label_value_bytes (1024)"),
        "{long_value}"
    );

    // The process keeps serving, and nothing of the refused calls was written.
    client
        .send_sensor_values(SensorValuesRequest {
            items: vec![item("after", None, Some(0.5), &four[..3])],
        })
        .await
        .expect("within the bounds");
    sink.stop();
    assert_eq!(sensor_names(&sink.path("out.json")), ["after"]);
}

/// What today's build wrote for requests of the original's clients (no
/// labels, no floats), `received_at` masked; the file was produced by the
/// build before floats and labels existed, and must not change.
const GOLDEN: &str = include_str!("golden/original-requests.jsonl");

#[tokio::test]
async fn the_originals_requests_are_written_byte_for_byte_as_before() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 1000"));
    let mut client = sink.client("sensors").await;
    let at = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
    let original = |name: &str, value: Option<i64>, created_at| SensorValue {
        sensor_name: name.into(),
        measurement: Some(Measurement {
            sensor_value: value,
            created_at,
            sensor_value_float: None,
        }),
        labels: BTreeMap::new(),
    };
    let items = vec![
        original("t1", Some(42), at(1_795_860_000, 0)),
        original("t2", Some(0), at(1_795_860_000, 512_000_000)),
        original("negative", Some(i64::MIN), at(0, 1)),
        original("max", Some(i64::MAX), at(253_402_300_799, 999_999_999)),
        original("no value", None, at(1, 1_000)),
        original("no time", Some(7), None),
        original(
            "ünï \"quoted\" \\ \n\u{1}",
            Some(-1),
            at(-62_135_596_800, 0),
        ),
        SensorValue {
            sensor_name: "no measurement".into(),
            measurement: None,
            labels: BTreeMap::new(),
        },
    ];
    client
        .send_sensor_values(SensorValuesRequest { items })
        .await
        .expect("accepted");
    sink.stop();
    let text = std::fs::read_to_string(sink.path("out.json")).expect("written");
    let masked: Vec<String> = text.lines().map(without_received_at).collect();
    let golden: Vec<&str> = GOLDEN.lines().collect();
    assert_eq!(masked, golden);
}

/// Readings share their sensor's name, which the sink remembers per thread
/// (1024 names of up to 128 bytes). Names that repeat, collide in that
/// memory, replace each other, are too long to remember, or are not ASCII,
/// sent over two connections at once (so both workers decode), each come
/// out with their own value, once.
#[tokio::test]
async fn shared_names_come_out_exact_however_they_repeat() {
    let pipeline = [
        grpc("sensors", ""),
        json_file("file", &["sensors"], "out.json", ""),
    ]
    .concat();
    let mut sink = SinkProcess::start(&pipeline);
    let long = "l".repeat(200);
    let name = move |i: usize| match i % 7 {
        0 => format!("{long}-{}", i % 50),
        1 => format!("température-ü-{}", i % 3000),
        _ => format!("sensor-{}", i % 3000),
    };
    const CALLS: usize = 20;
    const PER_CALL: usize = 250;
    let mut senders = Vec::new();
    for connection in 0..2 {
        let mut client = sink.client("sensors").await;
        let name = name.clone();
        senders.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for call in 0..CALLS {
                let items: Vec<SensorValue> = (0..PER_CALL)
                    .map(|j| {
                        let i = (connection * CALLS + call) * PER_CALL + j;
                        item(&name(i), Some(i as i64), None, &[])
                    })
                    .collect();
                sent.extend(items.iter().map(|item| {
                    (
                        item.sensor_name.clone(),
                        item.measurement.unwrap().sensor_value,
                    )
                }));
                client
                    .send_sensor_values(SensorValuesRequest { items })
                    .await
                    .expect("accepted");
            }
            sent
        }));
    }
    let mut sent = Vec::new();
    for sender in senders {
        sent.extend(sender.await.expect("sender"));
    }
    sink.stop();
    let mut written: Vec<(String, Option<i64>)> = json_lines(&sink.path("out.json"))
        .iter()
        .map(|line| {
            let name = line["sensor_name"].as_str().expect("a name").to_owned();
            (name, line["sensor_value"].as_i64())
        })
        .collect();
    sent.sort();
    written.sort();
    assert_eq!(written.len(), 2 * CALLS * PER_CALL);
    assert!(
        written == sent,
        "the readings written differ from those sent"
    );
}
