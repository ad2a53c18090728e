//! Chat templates: Python-compatible methods, HF's functions, and clear errors for bad
//! templates and bad messages. (Rendering real templates is compared with `transformers`
//! in `tests/e2e/test_llm_text.py`.)

use super::template_fns::strftime;
use super::{ChatTemplate, TextError};
use serde_json::json;

fn render(
    template: &str,
    messages: serde_json::Value,
    add_generation_prompt: bool,
) -> Result<String, TextError> {
    ChatTemplate::new(template, "<s>", "</s>")?.render(&messages, add_generation_prompt)
}

#[test]
fn variables_and_python_methods_reach_the_template() {
    let template = "{{ bos_token }}{% for m in messages %}{{ m['role'].upper() }}:{{ m.content.strip() }}\
{% if m.content.startswith(' x') %}!{% endif %}|{% endfor %}\
{% if tools is none %}T{% endif %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}";
    let out = render(
        template,
        json!([{"role": "user", "content": " x y "}, {"role": "bot", "content": "z"}]),
        true,
    )
    .expect("renders");
    assert_eq!(out, "<s>USER:x y!|BOT:z|T</s>");
}

#[test]
fn trim_and_lstrip_blocks_are_on_as_in_transformers() {
    let template = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}";
    assert_eq!(
        render(template, json!([{"role": "u", "content": "a"}]), false).expect("renders"),
        "a\n"
    );
}

#[test]
fn tojson_writes_what_python_json_dumps_writes() {
    let template = "{{ messages[0].extra | tojson }}|{{ messages[0].extra | tojson(indent=2) }}";
    let out = render(
        template,
        json!([{"role": "u", "content": "", "extra": {"a": [1, "x<y"], "b": null}}]),
        false,
    )
    .expect("renders");
    assert_eq!(
        out,
        "{\"a\": [1, \"x<y\"], \"b\": null}|{\n  \"a\": [\n    1,\n    \"x<y\"\n  ],\n  \"b\": null\n}"
    );
}

#[test]
fn raise_exception_is_the_templates_own_message() {
    let template = "{% if messages[0].role != 'system' %}{{ raise_exception('Conversation must start with system') }}{% endif %}";
    let err = render(template, json!([{"role": "user", "content": "hi"}]), false).unwrap_err();
    assert!(
        matches!(&err, TextError::TemplateRejected(m) if m == "Conversation must start with system"),
        "{err}"
    );
    assert!(err.is_client_error());
}

#[test]
fn a_template_that_does_not_compile_says_where() {
    let err = ChatTemplate::new("{% for m in messages %}\n{{ m.content }", "", "").unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("chat template: does not compile"),
        "{text}"
    );
    assert!(text.contains("line 2"), "{text}");
    assert!(!err.is_client_error());
}

#[test]
fn bad_messages_name_the_message_and_the_field() {
    let ok = "{% for m in messages %}{{ m.content }}{% endfor %}";
    for (messages, expected) in [
        (
            json!({"role": "user"}),
            "expected a list of messages, got an object",
        ),
        (json!([]), "the list is empty"),
        (json!(["hi"]), "[0] is a string, expected an object"),
        (
            json!([{"role": "user", "content": "a"}, {"content": "b"}]),
            "[1] has no \"role\"",
        ),
        (json!([{"role": 3, "content": "a"}]), "[0].role is a number"),
        (
            json!([{"role": "user", "content": 3}]),
            "[0].content is a number",
        ),
        (
            json!([{"role": "user", "content": [{"type": "image_url"}]}]),
            "[0].content[0] has type \"image_url\"",
        ),
    ] {
        let err = render(ok, messages, false).unwrap_err();
        assert!(
            matches!(err, TextError::Messages(_)) && err.is_client_error(),
            "{err}"
        );
        assert!(
            err.to_string().contains(expected),
            "{err} does not say {expected:?}"
        );
    }
}

#[test]
fn text_parts_become_one_string() {
    let ok = "{% for m in messages %}{{ m.content }}{% endfor %}";
    let parts = json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]);
    assert_eq!(render(ok, parts, false).expect("renders"), "a\nb");
}

#[test]
fn strftime_follows_python() {
    // 2026-03-05 14:07:09 UTC, a Thursday.
    let t = time::OffsetDateTime::from_unix_timestamp(1_772_719_629).expect("a valid time");
    assert_eq!(strftime(t, "%d %b %Y").expect("formats"), "05 Mar 2026");
    assert_eq!(
        strftime(t, "%-d %B %Y, %A %I:%M:%S %p %j %y %%").expect("formats"),
        "5 March 2026, Thursday 02:07:09 PM 064 26 %"
    );
    assert!(strftime(t, "%Q").unwrap_err().to_string().contains("%Q"));
    let out = render(
        "{{ strftime_now('%Y') }}",
        serde_json::json!([{"role": "u"}]),
        false,
    )
    .expect("renders");
    assert_eq!(out.len(), 4);
}

#[test]
fn values_print_as_python_prints_them() {
    let template = "{{ messages[0].v }}|{{ true }}|{{ none }}|{{ [1, 'a', \"it's\", none, false] }}|{{ {'k': 'x\\ny'} }}|{{ 2.5 }}";
    let out = render(
        template,
        json!([{"role": "u", "v": [true, null, "q"]}]),
        false,
    )
    .expect("renders");
    assert_eq!(
        out,
        "[True, None, 'q']|True|None|[1, 'a', \"it's\", None, False]|{'k': 'x\\ny'}|2.5"
    );
}
