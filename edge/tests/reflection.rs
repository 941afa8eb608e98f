//! gRPC reflection on the edge's gRPC port (`server.enable_reflection`): a
//! standard reflection client (what `grpcurl` uses) lists `EdgeDelivery` and
//! gets its descriptor; calls still need the internal token; off by default.

mod support;

use daisi_proto::EDGE_DELIVERY_SERVICE;
use support::{RunningEdge, Servers};
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

async fn channel(edge: &RunningEdge) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", edge.edge.grpc_addr)).unwrap().connect().await.unwrap()
}

/// One reflection request and its answer.
async fn ask(edge: &RunningEdge, request: MessageRequest) -> Result<ServerReflectionResponse, tonic::Status> {
    let mut client = ServerReflectionClient::new(channel(edge).await);
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(request) };
    let mut answers = client.server_reflection_info(futures_util::stream::iter([request])).await?.into_inner();
    Ok(answers.message().await?.expect("one answer"))
}

#[tokio::test]
async fn reflection_lists_and_describes_edge_delivery_when_enabled() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.server.enable_reflection = true;
    let edge = RunningEdge::start(cfg).await;

    let answer = ask(&edge, MessageRequest::ListServices(String::new())).await.unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&EDGE_DELIVERY_SERVICE), "{names:?}");

    let answer = ask(&edge, MessageRequest::FileContainingSymbol(EDGE_DELIVERY_SERVICE.into())).await.unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = answer.message_response else {
        panic!("no descriptor: {answer:?}");
    };
    use prost::Message;
    let file = prost_types::FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice()).unwrap();
    assert_eq!(file.package(), "daisi.delivery.v1");
    assert!(file.service.iter().any(|s| s.name() == "EdgeDelivery"), "{file:?}");

    // Describing is open; delivering still needs the internal token.
    let mut delivery = daisi_proto::delivery::edge_delivery_client::EdgeDeliveryClient::new(channel(&edge).await);
    let refused = delivery.deliver(futures_util::stream::empty()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
}

#[tokio::test]
async fn reflection_is_off_by_default() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let status = ask(&edge, MessageRequest::ListServices(String::new())).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
}
