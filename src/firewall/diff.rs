//! Pure comparison of the table the agent wants with the one read back from the kernel:
//! each difference as one line naming what differs (the reason of a repair).

use super::nft::Image;

/// Differences between `want` (None: no table wanted) and `have` (None: no table there).
/// Empty = in sync.
pub fn differences(table: &str, want: Option<&Image>, have: Option<&Image>) -> Vec<String> {
    let (want, have) = match (want, have) {
        (None, None) => return vec![],
        (Some(_), None) => return vec![format!("table inet {table} is missing")],
        (None, Some(_)) => return vec![format!("table inet {table} should not exist")],
        (Some(w), Some(h)) => (w, h),
    };
    let mut out = Vec::new();
    for (name, w) in &want.chains {
        match have.chains.get(name) {
            None => out.push(format!("chain {name} is missing")),
            Some(h) => {
                if h.base != w.base {
                    out.push(format!(
                        "chain {name}: hook {:?}, want {:?}",
                        h.base, w.base
                    ));
                }
                if h.rules != w.rules {
                    let first = w
                        .rules
                        .iter()
                        .zip(h.rules.iter())
                        .position(|(a, b)| a != b)
                        .unwrap_or(w.rules.len().min(h.rules.len()));
                    out.push(format!(
                        "chain {name}: {} rules, want {} (first difference at rule {first})",
                        h.rules.len(),
                        w.rules.len()
                    ));
                }
            }
        }
    }
    for name in have.chains.keys() {
        if !want.chains.contains_key(name) {
            out.push(format!("chain {name} is not ours"));
        }
    }
    for (name, w) in &want.sets {
        match have.sets.get(name) {
            None => out.push(format!("set {name} is missing")),
            Some(h) => {
                if (h.flags, h.key_type, h.key_len) != (w.flags, w.key_type, w.key_len) {
                    out.push(format!(
                        "set {name}: flags/type/len {:?}, want {:?}",
                        (h.flags, h.key_type, h.key_len),
                        (w.flags, w.key_type, w.key_len)
                    ));
                }
                if h.elements != w.elements {
                    let missing = w
                        .elements
                        .iter()
                        .filter(|e| !h.elements.contains(e))
                        .count();
                    let extra = h
                        .elements
                        .iter()
                        .filter(|e| !w.elements.contains(e))
                        .count();
                    out.push(format!(
                        "set {name}: {missing} elements missing, {extra} not ours"
                    ));
                }
            }
        }
    }
    for name in have.sets.keys() {
        if !want.sets.contains_key(name) {
            out.push(format!("set {name} is not ours"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::nft::{ChainImage, SetImage};
    use crate::firewall::render::Element;

    fn img() -> Image {
        let mut i = Image::default();
        i.chains.insert(
            "policy".into(),
            ChainImage {
                base: None,
                rules: vec!["a".into(), "b".into()],
            },
        );
        i.sets.insert(
            "r0_s4".into(),
            SetImage {
                flags: 4,
                key_type: 7,
                key_len: 4,
                elements: vec![Element {
                    key: vec![10, 0, 0, 1],
                    end: false,
                }],
            },
        );
        i
    }

    #[test]
    fn equal_tables_have_no_difference() {
        assert!(differences("t", Some(&img()), Some(&img())).is_empty());
        assert!(differences("t", None, None).is_empty());
    }

    #[test]
    fn each_kind_of_drift_is_named() {
        let want = img();
        assert_eq!(
            differences("t", Some(&want), None),
            vec!["table inet t is missing"]
        );
        assert_eq!(
            differences("t", None, Some(&want)),
            vec!["table inet t should not exist"]
        );
        let mut h = img();
        h.chains.get_mut("policy").unwrap().rules[1] = "c".into();
        let d = differences("t", Some(&want), Some(&h));
        assert_eq!(
            d,
            vec!["chain policy: 2 rules, want 2 (first difference at rule 1)"]
        );
        let mut h = img();
        h.sets.get_mut("r0_s4").unwrap().elements.push(Element {
            key: vec![10, 0, 0, 9],
            end: false,
        });
        h.chains.insert("extra".into(), ChainImage::default());
        let d = differences("t", Some(&want), Some(&h));
        assert_eq!(
            d,
            vec![
                "chain extra is not ours",
                "set r0_s4: 0 elements missing, 1 not ours"
            ]
        );
    }
}
