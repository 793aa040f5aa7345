//! A loopback S3-compatible server (s3s-fs) for the bucket bench:
//! `s3server ROOT` serves ROOT (a bucket is a directory under it) with the
//! key `bench` / secret `benchsecret`, and prints its endpoint on stdout.

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

fn main() {
    let root = std::env::args().nth(1).expect("usage: s3server ROOT");
    std::fs::create_dir_all(&root).expect("root");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut b = S3ServiceBuilder::new(s3s_fs::FileSystem::new(&root).expect("s3s-fs"));
        b.set_auth(SimpleAuth::from_single("bench", "benchsecret"));
        let service = b.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("http://{}", listener.local_addr().expect("addr"));
        use std::io::Write;
        std::io::stdout().flush().ok();
        let http = ConnBuilder::new(TokioExecutor::new());
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let conn = http
                .serve_connection(TokioIo::new(sock), service.clone())
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
}
