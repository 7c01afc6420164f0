//! Users as an image config names them (`name`, `uid`, `name:group`, `uid:gid`), resolved
//! against the guest's own `/etc/passwd` and `/etc/group` (the agent is static: no NSS).

use std::path::Path;

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory, when the passwd file has the user.
    pub home: Option<String>,
}

/// Fields of the line of `file` whose first field is `name` (or whose third is `id`).
fn lookup(file: &Path, name: Option<&str>, id: Option<u32>) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .map(|l| l.split(':').map(str::to_owned).collect::<Vec<_>>())
        .find(|f| {
            f.len() >= 3
                && (name.is_some_and(|n| f[0] == n)
                    || id.is_some_and(|i| f[2].parse::<u32>() == Ok(i)))
        })
}

/// Resolve `spec` with the files under `etc`.
pub fn resolve(spec: &str, etc: &Path) -> Result<Ids, String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = etc.join("passwd");
    let (uid, mut gid, home) = match user.parse::<u32>() {
        Ok(uid) => match lookup(&passwd, None, Some(uid)) {
            Some(f) if f.len() >= 6 => (uid, f[3].parse().unwrap_or(uid), Some(f[5].clone())),
            // A numeric user need not exist (as in Docker): its group is its uid's number.
            _ => (uid, uid, None),
        },
        Err(_) => {
            let f = lookup(&passwd, Some(user), None)
                .filter(|f| f.len() >= 6)
                .ok_or_else(|| format!("user {user:?} not found in /etc/passwd"))?;
            let uid = f[2]
                .parse()
                .map_err(|_| format!("user {user:?}: bad uid {:?}", f[2]))?;
            let gid = f[3]
                .parse()
                .map_err(|_| format!("user {user:?}: bad gid {:?}", f[3]))?;
            (uid, gid, Some(f[5].clone()))
        }
    };
    if let Some(g) = group {
        gid = match g.parse::<u32>() {
            Ok(g) => g,
            Err(_) => lookup(&etc.join("group"), Some(g), None)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| format!("group {g:?} not found in /etc/group"))?,
        };
    }
    Ok(Ids { uid, gid, home })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\napp:x:1000:100::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("group"),
            "root:x:0:\nusers:x:100:\nwheel:x:10:app\n",
        )
        .unwrap();
        let r = |s| resolve(s, dir.path());
        assert_eq!(
            r("app").unwrap(),
            Ids {
                uid: 1000,
                gid: 100,
                home: Some("/home/app".into())
            }
        );
        assert_eq!(r("1000").unwrap().gid, 100);
        assert_eq!(
            r("4242").unwrap(),
            Ids {
                uid: 4242,
                gid: 4242,
                home: None
            }
        );
        assert_eq!(r("app:wheel").unwrap().gid, 10);
        assert_eq!(
            r("0:7").unwrap(),
            Ids {
                uid: 0,
                gid: 7,
                home: Some("/root".into())
            }
        );
        assert!(r("ghost").unwrap_err().contains("ghost"));
        assert!(r("app:ghosts").unwrap_err().contains("ghosts"));
    }
}
