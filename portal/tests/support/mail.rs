//! The mail a portal with no SMTP server writes to files (`data/mail/*.eml`), read back by
//! tests as a person reads their inbox.

use std::path::Path;
use std::time::Duration;

/// The code mailed to `email`, once its mail is written (polled, with a deadline: the portal
/// writes it on a task of its own after answering).
pub async fn mailed_code(mail: &Path, email: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mails = std::fs::read_dir(mail)
            .map(|entries| entries.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        let code = mails
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "eml"))
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .filter(|m| m.contains(&format!("To: {email}")))
            .find_map(|m| {
                m.lines()
                    .map(str::trim)
                    .find(|l| l.len() == 9 && l.as_bytes()[4] == b'-')
                    .map(str::to_owned)
            });
        if let Some(code) = code {
            return code;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no mail for {email}"
        );
        // A poll interval, not a synchronisation: the mail is written on its own task.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
