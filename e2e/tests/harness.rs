//! The harness's own faults do what they say: a cut, one-way drops and
//! their removal, seen as TCP connects from one host to another's marsd.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Result, ensure};
use mars_e2e::{Cluster, run, start_or_skip};

/// Whether `from` can open a TCP connection to `to`'s replication port
/// within 1 s.
fn reaches(c: &Cluster, from: &str, to: &str) -> Result<bool> {
    let addr: SocketAddr = c.host(to).peer_addr().parse()?;
    let ok = c
        .host(from)
        .netns()
        .enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok())?;
    Ok(ok)
}

/// Whether `from` reaches `to` within 10 s of trying: a restored link
/// needs a moment (carrier, ARP entries left FAILED by the cut), and the
/// claim is that traffic comes back, not that it does so in one SYN.
fn comes_back(c: &Cluster, from: &str, to: &str) -> Result<bool> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if reaches(c, from, to)? {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn cuts_and_drops_stop_traffic_and_restores_bring_it_back() {
    let Some(mut c) = start_or_skip(&["a", "b"]) else {
        return;
    };
    run(&mut c, |c| {
        ensure!(
            reaches(c, "a", "b")? && reaches(c, "b", "a")?,
            "no traffic at first"
        );
        c.cut("b")?;
        ensure!(
            !reaches(c, "a", "b")? && !reaches(c, "b", "a")?,
            "traffic through a cut"
        );
        c.restore("b")?;
        ensure!(comes_back(c, "a", "b")?, "no traffic after restore");
        if !c.has_nft() {
            eprintln!("note: nft is missing (apt-get install nftables): drops not checked");
            return Ok(());
        }
        // Inbound drop on b: nothing reaches b, and b's SYNs get no answer
        // either (the SYN-ACK is dropped on the way in).
        c.drop_inbound("b")?;
        ensure!(
            !reaches(c, "a", "b")?,
            "a reached b through an inbound drop"
        );
        ensure!(
            !reaches(c, "b", "a")?,
            "b got answers through an inbound drop"
        );
        c.clear_filter("b")?;
        ensure!(
            comes_back(c, "a", "b")?,
            "no traffic after clearing the filter"
        );
        c.drop_outbound("a")?;
        ensure!(!reaches(c, "a", "b")?, "a sent through an outbound drop");
        c.clear_filter("a")?;
        c.loss("a", 100)?;
        ensure!(!reaches(c, "b", "a")?, "traffic through 100 % loss");
        c.loss("a", 0)?;
        ensure!(comes_back(c, "b", "a")?, "no traffic at 0 % loss");
        c.rate_limit("a", "1mbit")?;
        ensure!(comes_back(c, "b", "a")?, "no traffic through a rate limit");
        c.clear_rate_limit("a")?;
        Ok(())
    });
}
