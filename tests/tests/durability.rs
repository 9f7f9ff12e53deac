//! Data survives restarts, and a consumer that was down catches up by replay.

use blog_common::Service;
use blog_tests::TestSuite;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_query_catches_up_when_it_starts_again() {
    let suite = TestSuite::launch().await;
    let before = suite.create_post("before").await;
    suite.eventually("the first post in query", || async { suite.view().await.contains_key(&before.id).then_some(()) }).await;

    suite.stop(Service::Query).await;
    let during = suite.create_post("while query was down").await;
    let comment = suite.comment(&during.id, "missed by query").await.remove(0);
    // Moderation and comments still do their part while query is down.
    suite
        .eventually("comments to record the decision", || async {
            (suite.comments(&during.id).await[0].status == "approved").then_some(())
        })
        .await;

    suite.restart(Service::Query).await;
    suite.wait_for_status(&during.id, &comment.id, "approved").await;
    let view = suite.view().await;
    assert_eq!(view.len(), 2);
    assert_eq!(view[&during.id].comments.len(), 1);
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_service_keeps_all_data() {
    let suite = TestSuite::launch().await;
    let post = suite.create_post("kept").await;
    let good = suite.comment(&post.id, "good").await.remove(0);
    let bad = suite.comment(&post.id, "orange").await.remove(1);
    suite.wait_for_status(&post.id, &bad.id, "rejected").await;
    suite.wait_for_status(&post.id, &good.id, "approved").await;
    let log_before = suite.bus_events().await.len();

    for service in Service::ALL {
        suite.stop(service).await;
    }
    for service in Service::ALL {
        suite.restart(service).await;
    }

    let view = suite.view().await;
    assert_eq!(view.len(), 1);
    let statuses: Vec<_> = view[&post.id].comments.iter().map(|c| c.status.as_str()).collect();
    assert_eq!(statuses, ["approved", "rejected"]);
    assert_eq!(suite.comments(&post.id).await.len(), 2);
    assert_eq!(suite.bus_events().await.len(), log_before);

    // And the suite keeps working after the restart.
    let late = suite.comment(&post.id, "after restart").await.remove(2);
    suite.wait_for_status(&post.id, &late.id, "approved").await;
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_view_can_be_rebuilt_from_the_bus_alone() {
    let suite = TestSuite::launch().await;
    let post = suite.create_post("rebuild me").await;
    let comment = suite.comment(&post.id, "still here").await.remove(0);
    suite.wait_for_status(&post.id, &comment.id, "approved").await;

    suite.stop(Service::Query).await;
    std::fs::remove_dir_all(suite.dir.path().join("data").join("query")).expect("query's data removed");
    suite.restart(Service::Query).await;

    suite.wait_for_status(&post.id, &comment.id, "approved").await;
    assert_eq!(suite.view().await.len(), 1);
    suite.shutdown().await;
}
