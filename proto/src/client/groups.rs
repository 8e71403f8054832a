//! Consumer groups (`ordo.v1.Feed`, served by routers): the admin calls `ordoctl feed` makes
//! and a member's `Consume` stream.

use tokio_stream::Stream;
use tonic::Status;

use super::{deadline_exceeded, feed, Client};
use crate::retry::{classify, Action, Effect};
use crate::v1::{
    ConsumeRequest, ConsumeResponse, ConsumerGroup, CreateGroupRequest, DeleteGroupRequest,
    DeleteGroupResponse, DescribeGroupRequest, ListGroupsRequest, ListGroupsResponse,
    SeekGroupRequest, UnparkRequest,
};

impl Client {
    /// Creates a consumer group. The same definition again answers the group as it is (so a
    /// retry after an unknown outcome is safe); another definition under the name is
    /// `ALREADY_EXISTS`.
    pub async fn create_group(&self, req: CreateGroupRequest) -> Result<ConsumerGroup, Status> {
        self.core
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
                feed(ch).create_group(r).await
            })
            .await
    }

    /// The group's definition and its state per slot; `NOT_FOUND` if no slot has it.
    pub async fn describe_group(&self, group: &str) -> Result<ConsumerGroup, Status> {
        let req = DescribeGroupRequest {
            group: group.to_string(),
        };
        self.core
            .call(req, Effect::Read, |ch, r| async move {
                feed(ch).describe_group(r).await
            })
            .await
    }

    /// Every group, in name order.
    pub async fn list_groups(&self) -> Result<ListGroupsResponse, Status> {
        self.core
            .call(ListGroupsRequest {}, Effect::Read, |ch, r| async move {
                feed(ch).list_groups(r).await
            })
            .await
    }

    /// Deletes the group; deleting one that does not exist answers `deleted == false`, so a
    /// retry is safe (it may then report `false` for a delete its first attempt did).
    pub async fn delete_group(&self, group: &str) -> Result<DeleteGroupResponse, Status> {
        let req = DeleteGroupRequest {
            group: group.to_string(),
        };
        self.core
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
                feed(ch).delete_group(r).await
            })
            .await
    }

    /// Moves the group's committed position in every slot. Seeking to the same start again
    /// lands where the first did (or later, for `now`), so it is retried like a read.
    pub async fn seek_group(&self, req: SeekGroupRequest) -> Result<ConsumerGroup, Status> {
        self.core
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
                feed(ch).seek_group(r).await
            })
            .await
    }

    /// Releases a parked order. Retried only when certainly not applied: a second unpark of
    /// the same order is `NOT_FOUND`, which would hide that the first one worked.
    pub async fn unpark(&self, req: UnparkRequest) -> Result<ConsumerGroup, Status> {
        self.core
            .call(req, Effect::Write, |ch, r| async move {
                feed(ch).unpark(r).await
            })
            .await
    }

    /// Opens a member's `Consume` stream: `requests` must start with a `Join`. One attempt, on
    /// the remembered router or the next address, bounded by the client's timeout until the
    /// stream is established; a failure moves the client on, so a member that rejoins in a loop
    /// reaches another router. The stream has no deadline.
    pub async fn consume(
        &self,
        requests: impl Stream<Item = ConsumeRequest> + Send + 'static,
    ) -> Result<tonic::Streaming<ConsumeResponse>, Status> {
        let addr = self.core.target();
        let mut stub = feed(self.core.channel(&addr)?);
        match tokio::time::timeout(self.core.timeout, stub.consume(requests)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => {
                self.core.reroute(&addr, classify(&status, Effect::Read));
                Err(status)
            }
            Err(_elapsed) => {
                self.core.reroute(&addr, Action::Rotate);
                Err(deadline_exceeded(self.core.timeout, 1))
            }
        }
    }
}
