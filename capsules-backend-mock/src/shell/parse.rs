//! The tiny shell's grammar: words, quoting, `$` expansions, lists and redirections.

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Part {
    /// Literal text (quoted or not: no splitting happens to literals).
    Lit(String),
    Var {
        name: String,
        quoted: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Word {
    pub(super) parts: Vec<Part>,
    pub(super) quoted: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
    Word(Word),
    Op(&'static str),
}

#[derive(Debug, Clone)]
pub(super) enum Redir {
    Out { fd: u8, target: Word, append: bool },
    Dup { from: u8 },
    In(Word),
}

#[derive(Debug, Clone, Default)]
pub(super) struct Simple {
    pub(super) words: Vec<Word>,
    pub(super) redirs: Vec<Redir>,
}

#[derive(Debug, Clone)]
pub(super) struct AndOr {
    pub(super) first: Simple,
    pub(super) rest: Vec<(bool, Simple)>,
}

#[derive(Debug, Clone)]
pub(super) struct Stmt {
    pub(super) list: AndOr,
    pub(super) background: bool,
}

pub(super) fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let c: Vec<char> = s.chars().collect();
    let mut toks = Vec::new();
    let mut cur: Option<Word> = None;
    let mut lit = String::new();
    let mut i = 0;

    fn flush_lit(cur: &mut Option<Word>, lit: &mut String) {
        if !lit.is_empty() {
            cur.get_or_insert(Word {
                parts: vec![],
                quoted: false,
            })
            .parts
            .push(Part::Lit(std::mem::take(lit)));
        }
    }
    fn end_word(toks: &mut Vec<Tok>, cur: &mut Option<Word>, lit: &mut String) {
        flush_lit(cur, lit);
        if let Some(w) = cur.take() {
            toks.push(Tok::Word(w));
        }
    }
    fn var(c: &[char], i: usize) -> Option<(String, usize)> {
        match c.get(i)? {
            '{' => {
                let end = c[i..].iter().position(|&x| x == '}')? + i;
                Some((c[i + 1..end].iter().collect(), end + 1))
            }
            x if "?#@*$!".contains(*x) || x.is_ascii_digit() => Some((x.to_string(), i + 1)),
            x if x.is_ascii_alphabetic() || *x == '_' => {
                let mut j = i;
                while j < c.len() && (c[j].is_ascii_alphanumeric() || c[j] == '_') {
                    j += 1;
                }
                Some((c[i..j].iter().collect(), j))
            }
            _ => None,
        }
    }

    while i < c.len() {
        let ch = c[i];
        match ch {
            ' ' | '\t' => {
                end_word(&mut toks, &mut cur, &mut lit);
                i += 1;
            }
            '\n' | ';' => {
                end_word(&mut toks, &mut cur, &mut lit);
                toks.push(Tok::Op(";"));
                i += 1;
            }
            '#' if cur.is_none() && lit.is_empty() => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '&' | '|' => {
                end_word(&mut toks, &mut cur, &mut lit);
                let double = c.get(i + 1) == Some(&ch);
                toks.push(Tok::Op(match (ch, double) {
                    ('&', true) => "&&",
                    ('&', false) => "&",
                    ('|', true) => "||",
                    _ => return Err("pipes are not supported by the mock shell".to_owned()),
                }));
                i += if double { 2 } else { 1 };
            }
            '>' | '<' => {
                // An unquoted lone digit right before is the fd.
                let fd = match (&cur, lit.as_str()) {
                    (None, "1") => Some(1),
                    (None, "2") => Some(2),
                    _ => None,
                };
                if fd.is_some() {
                    lit.clear();
                }
                end_word(&mut toks, &mut cur, &mut lit);
                let rest: String = c[i..c.len().min(i + 3)].iter().collect();
                let (op, len) = match (ch, fd.unwrap_or(if ch == '<' { 0 } else { 1 })) {
                    ('<', _) => ("<", 1),
                    (_, 1) if rest.starts_with(">&2") => (">&2", 3),
                    (_, 2) if rest.starts_with(">&1") => ("2>&1", 3),
                    (_, 1) if rest.starts_with(">>") => (">>", 2),
                    (_, 2) if rest.starts_with(">>") => ("2>>", 2),
                    (_, 1) => (">", 1),
                    (_, 2) => ("2>", 1),
                    _ => return Err("unsupported redirection".to_owned()),
                };
                toks.push(Tok::Op(op));
                i += len;
            }
            '(' | ')' | '{' | '}' | '`' if cur.is_none() && lit.is_empty() || ch == '`' => {
                return Err(format!(
                    "'{ch}' (subshells, groups, command substitution) is not supported by the mock shell"
                ));
            }
            '\'' => {
                let end = c[i + 1..]
                    .iter()
                    .position(|&x| x == '\'')
                    .ok_or("unterminated quoted string")?
                    + i
                    + 1;
                flush_lit(&mut cur, &mut lit);
                let w = cur.get_or_insert(Word {
                    parts: vec![],
                    quoted: true,
                });
                w.quoted = true;
                w.parts.push(Part::Lit(c[i + 1..end].iter().collect()));
                i = end + 1;
            }
            '"' => {
                flush_lit(&mut cur, &mut lit);
                cur.get_or_insert(Word {
                    parts: vec![],
                    quoted: true,
                })
                .quoted = true;
                i += 1;
                loop {
                    let Some(&d) = c.get(i) else {
                        return Err("unterminated quoted string".to_owned());
                    };
                    match d {
                        '"' => {
                            i += 1;
                            break;
                        }
                        '\\' if c.get(i + 1).is_some_and(|n| "$`\"\\\n".contains(*n)) => {
                            if c[i + 1] != '\n' {
                                lit.push(c[i + 1]);
                            }
                            i += 2;
                        }
                        '$' if c.get(i + 1) == Some(&'(') => {
                            return Err("command substitution is not supported by the mock shell".to_owned());
                        }
                        '$' => match var(&c, i + 1) {
                            Some((name, next)) => {
                                flush_lit(&mut cur, &mut lit);
                                if let Some(w) = cur.as_mut() {
                                    w.parts.push(Part::Var { name, quoted: true })
                                }
                                i = next;
                            }
                            None => {
                                lit.push('$');
                                i += 1;
                            }
                        },
                        '`' => return Err("command substitution is not supported by the mock shell".to_owned()),
                        d => {
                            lit.push(d);
                            i += 1;
                        }
                    }
                }
                flush_lit(&mut cur, &mut lit);
            }
            '\\' => {
                if let Some(&n) = c.get(i + 1)
                    && n != '\n'
                {
                    {
                        lit.push(n);
                        cur.get_or_insert(Word {
                            parts: vec![],
                            quoted: true,
                        });
                    }
                }
                i += 2;
            }
            '$' if c.get(i + 1) == Some(&'(') => {
                return Err("command substitution is not supported by the mock shell".to_owned());
            }
            '$' => match var(&c, i + 1) {
                Some((name, next)) => {
                    flush_lit(&mut cur, &mut lit);
                    cur.get_or_insert(Word {
                        parts: vec![],
                        quoted: false,
                    })
                    .parts
                    .push(Part::Var { name, quoted: false });
                    i = next;
                }
                None => {
                    lit.push('$');
                    i += 1;
                }
            },
            ch => {
                lit.push(ch);
                i += 1;
            }
        }
    }
    end_word(&mut toks, &mut cur, &mut lit);
    Ok(toks)
}

pub(super) fn parse(s: &str) -> Result<Vec<Stmt>, String> {
    let toks = tokenize(s)?;
    let mut stmts = Vec::new();
    let mut it = toks.into_iter().peekable();
    let mut simple = Simple::default();
    let mut list: Option<AndOr> = None;
    let mut pending_and: Option<bool> = None;

    fn push_simple(list: &mut Option<AndOr>, pending: &mut Option<bool>, s: Simple) -> Result<(), String> {
        match (list.as_mut(), pending.take()) {
            (None, None) => *list = Some(AndOr { first: s, rest: vec![] }),
            (Some(l), Some(and)) => l.rest.push((and, s)),
            _ => return Err("syntax error".to_owned()),
        }
        Ok(())
    }

    while let Some(t) = it.next() {
        match t {
            Tok::Word(w) => simple.words.push(w),
            Tok::Op(op @ (">" | ">>" | "2>" | "2>>" | "<")) => {
                let Some(Tok::Word(target)) = it.next() else {
                    return Err(format!("syntax error: '{op}' needs a file name"));
                };
                simple.redirs.push(match op {
                    "<" => Redir::In(target),
                    _ => Redir::Out {
                        fd: if op.starts_with('2') { 2 } else { 1 },
                        target,
                        append: op.ends_with(">>"),
                    },
                });
            }
            Tok::Op(">&2") => simple.redirs.push(Redir::Dup { from: 1 }),
            Tok::Op("2>&1") => simple.redirs.push(Redir::Dup { from: 2 }),
            Tok::Op(op @ ("&&" | "||")) => {
                if simple.words.is_empty() {
                    return Err(format!("syntax error near '{op}'"));
                }
                push_simple(&mut list, &mut pending_and, std::mem::take(&mut simple))?;
                pending_and = Some(op == "&&");
            }
            Tok::Op(op @ (";" | "&")) => {
                if simple.words.is_empty() && simple.redirs.is_empty() {
                    if pending_and.is_some() || (op == "&" && list.is_none()) {
                        return Err(format!("syntax error near '{op}'"));
                    }
                } else {
                    push_simple(&mut list, &mut pending_and, std::mem::take(&mut simple))?;
                }
                if let Some(l) = list.take() {
                    stmts.push(Stmt {
                        list: l,
                        background: op == "&",
                    });
                }
            }
            Tok::Op(op) => return Err(format!("syntax error near '{op}'")),
        }
    }
    if !simple.words.is_empty() || !simple.redirs.is_empty() {
        push_simple(&mut list, &mut pending_and, simple)?;
    } else if pending_and.is_some() {
        return Err("syntax error: unexpected end of script".to_owned());
    }
    if let Some(l) = list {
        stmts.push(Stmt {
            list: l,
            background: false,
        });
    }
    Ok(stmts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_redirections() {
        let s = parse("a 'b c' && d || e; f & g >&2 2>/dev/null").unwrap();
        assert_eq!(s.len(), 3);
        assert!(s[1].background);
        assert_eq!(s[0].list.rest.len(), 2);
        assert!(parse("a | b").is_err());
        assert!(parse("echo $(id)").is_err());
        assert!(parse("a &&").is_err());
    }

    #[test]
    fn tokenizes_quotes() {
        let t = tokenize(r#"printf "[%s]" "$FOO" 'x$y' a\ b"#).unwrap();
        assert_eq!(t.len(), 5);
        assert_eq!(
            t[2],
            Tok::Word(Word {
                parts: vec![Part::Var {
                    name: "FOO".into(),
                    quoted: true
                }],
                quoted: true
            })
        );
        assert_eq!(
            t[3],
            Tok::Word(Word {
                parts: vec![Part::Lit("x$y".into())],
                quoted: true
            })
        );
        assert_eq!(
            t[4],
            Tok::Word(Word {
                parts: vec![Part::Lit("a b".into())],
                quoted: true
            })
        );
    }
}
