"""The ``data-*`` attribute builder: datastar-py's, lazily loaded, as the Jinja global ``data``.

Its output was checked against the Datastar 1.0 client (``tests/browser/
test_attribute_builder.py`` runs it there); these tests pin the attribute syntax and
the one place where it differs from datastar-py's own builder.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from flask import Flask, render_template_string

from flask_datastar import AttributeGenerator, attribute_generator, sse_post
from tests.helpers import REPO_ROOT, require_module


@pytest.fixture
def theirs():  # type: ignore[no-untyped-def]
    return require_module("datastar_py", "datastar-py").attribute_generator


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (
            "{{ data.on('click', sse_post('/vote')).debounce('500ms').stop }}",
            'data-on:click__case.kebab__debounce.500ms__stop="@post(&#39;/vote&#39;)"',
        ),
        ("{{ data.init(sse_get('/updates')) }}", 'data-init="@get(&#39;/updates&#39;)"'),
        (
            "{{ data.signals(count=1, user={'name': 'Ada'}).ifmissing }}",
            'data-signals__ifmissing="{&#34;count&#34;: 1, &#34;user&#34;: {&#34;name&#34;:'
            ' &#34;Ada&#34;}}"',
        ),
        (
            "{{ data.computed(fullName='$first + $last') }}",
            'data-computed:full-name__case.camel="$first + $last"',
        ),
        ("{{ data.bind('query') }}", 'data-bind="query"'),
        ("{{ data.text('$count') }}", 'data-text="$count"'),
        ("{{ data.show('$open') }}", 'data-show="$open"'),
        ("{{ data.class_(hidden='!$open') }}", 'data-class="{&#34;hidden&#34;: (!$open)}"'),
        (
            "{{ data.on_interval('$t++').duration('1s', leading=True) }}",
            'data-on-interval__duration.1s.leading="$t++"',
        ),
        ("{{ data.ignore_morph }}", "data-ignore-morph"),
    ],
)
def test_the_jinja_global_writes_datastar_1_attributes(
    app: Flask, template: str, expected: str
) -> None:
    require_module("datastar_py", "datastar-py")
    with app.app_context():
        assert render_template_string(template) == expected


def test_an_at_sign_in_a_signal_value_is_escaped(theirs) -> None:  # type: ignore[no-untyped-def]
    ours = attribute_generator.signals(note="write @get('/x')", n=1)
    assert dict(ours) == {"data-signals": '{"note": "write \\u0040get(\'/x\')", "n": 1}'}
    # datastar-py's own builder leaves it, and the client would rewrite it into a call.
    assert dict(theirs.signals(note="write @get('/x')", n=1)) == {
        "data-signals": '{"note": "write @get(\'/x\')", "n": 1}'
    }


def test_expressions_keep_their_actions(theirs) -> None:  # type: ignore[no-untyped-def]
    # With expressions, an "@" may be an action call: left as datastar-py writes it.
    action = sse_post("/x")
    assert str(attribute_generator.signals(a=action, expressions_=True)) == str(
        theirs.signals(a=action, expressions_=True)
    )
    value = {"a": theirs.JSExpression("@peek(() => $b)"), "b": "@x("}
    assert str(attribute_generator.signals(value)) == str(theirs.signals(value))


def test_everything_else_is_datastar_pys_output(theirs) -> None:  # type: ignore[no-untyped-def]
    data = attribute_generator
    for build in (
        lambda d: d.on("keydown", "$k = evt.key").window.throttle(100, trailing=True),
        lambda d: d.on("myEvent", "$x").once,
        lambda d: d.signals({"a": [1, 2.5, None, True]}),
        lambda d: d.attr(disabled="$busy"),
        lambda d: d.on_signal_patch("$n++", include="^count"),
        lambda d: d.json_signals(include="^a").terse,
        lambda d: d.preserve_attr(["open", "class"]),
    ):
        assert str(build(data)) == str(build(theirs))


def test_an_alias(theirs) -> None:  # type: ignore[no-untyped-def]
    data = AttributeGenerator(alias="data-star-")
    assert str(data.signals(a="@b(")) == 'data-star-signals="{&#34;a&#34;: &#34;\\u0040b(&#34;}"'
    assert str(data.show("$a")) == 'data-star-show="$a"'
    assert repr(data) == "<AttributeGenerator 'data-star-'>"


def test_without_datastar_py_a_clear_error_when_used() -> None:
    # datastar-py is blocked (None in sys.modules makes its import fail), as if not installed.
    code = (
        "import sys; sys.modules['datastar_py'] = None\n"
        "from flask import Flask\n"
        "from flask_datastar import FlaskDatastar, attribute_generator as data\n"
        "FlaskDatastar(Flask('x'))\n"
        "try:\n"
        "    data.on('click', '$x')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert "install it with 'pip install flask_datastar[datastar]'" in out.stdout


def test_datastar_py_is_imported_only_when_used() -> None:
    code = (
        "import sys\n"
        "from flask import Flask, render_template_string\n"
        "from flask_datastar import FlaskDatastar\n"
        "app = Flask('x'); FlaskDatastar(app)\n"
        "with app.app_context(): render_template_string('{{ sse_get(\"/a\") }}')\n"
        "print('datastar_py' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
