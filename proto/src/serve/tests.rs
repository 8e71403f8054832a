use super::*;

fn metered(budget: &RequestBudget) -> Metered {
    Metered {
        inner: Body::empty(),
        held: Arc::new(Held {
            budget: budget.clone(),
            bytes: AtomicUsize::new(0),
        }),
        header: [0; GRPC_HEADER_BYTES],
        header_len: 0,
        payload_left: 0,
    }
}

fn frame(len: u32) -> Vec<u8> {
    let mut f = vec![0];
    f.extend_from_slice(&len.to_be_bytes());
    f
}

#[test]
fn m1_each_message_takes_its_declared_size_as_its_header_arrives() {
    let budget = RequestBudget::new(REQUEST_BYTES_BUDGET_MIN).unwrap();
    let mut body = metered(&budget);
    // A header split over two chunks, its payload over two more, then the next message's header
    // and part of its payload in one chunk.
    let header = frame(10);
    body.count(&header[..2]).unwrap();
    assert_eq!(
        budget.available(),
        REQUEST_BYTES_BUDGET_MIN,
        "no header yet"
    );
    body.count(&header[2..]).unwrap();
    assert_eq!(budget.available(), REQUEST_BYTES_BUDGET_MIN - 15);
    body.count(&[7; 4]).unwrap();
    let mut chunk = vec![7; 6];
    chunk.extend(frame(1000));
    chunk.extend([1; 1000]);
    body.count(&chunk).unwrap();
    assert_eq!(budget.available(), REQUEST_BYTES_BUDGET_MIN - 15 - 1005);

    // A message the rest of the budget cannot hold is refused at its header, naming the budget.
    let err = body
        .count(&frame(REQUEST_BYTES_BUDGET_MIN as u32))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(
        err.message().contains(&format!(
            "request-bytes budget of {REQUEST_BYTES_BUDGET_MIN} bytes"
        )),
        "{}",
        err.message()
    );
    assert_eq!(budget.available(), REQUEST_BYTES_BUDGET_MIN - 1020);
    // Everything comes back when the request is done.
    drop(body);
    assert_eq!(budget.available(), REQUEST_BYTES_BUDGET_MIN);
}

#[test]
fn m1_limits_out_of_bounds_are_refused_naming_the_bound() {
    let err = ServeLimits::new(0, REQUEST_BYTES_BUDGET_DEFAULT).unwrap_err();
    assert!(err.to_string().contains("CONNECTIONS_MAX_LIMIT"), "{err}");
    let err = ServeLimits::new(10, 1024).unwrap_err();
    assert!(
        err.to_string().contains("REQUEST_BYTES_BUDGET_MIN") && err.to_string().contains("1024"),
        "{err}"
    );
    let ok = ServeLimits::default();
    assert_eq!(ok.connections_max, CONNECTIONS_MAX_DEFAULT);
    assert_eq!(ok.request_bytes.bytes(), REQUEST_BYTES_BUDGET_DEFAULT);
}

#[test]
fn unbudgeted_paths_name_the_peer_streams() {
    for path in UNBUDGETED_PATHS {
        assert!(
            path.starts_with(&format!("/{}/", crate::v1::peer_server::SERVICE_NAME)),
            "{path}"
        );
    }
}
