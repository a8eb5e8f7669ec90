"""Rule expressions and templates cannot read files or the environment, import, or reach
Python internals: the known escapes of Jinja2's sandbox, each tried through the rule engine's
own environment, over a context holding real objects."""

from __future__ import annotations

import jinja2
import pytest
from jinja2.exceptions import SecurityError

from bridge.config import RuleConfig
from bridge.expressions import MAX_SIZE as MAX_SEQUENCE
from bridge.rules import ENV, RuleSet

MARKER = "sandbox-marker-7f3a"

ESCAPES = [
    # Reaching object's subclasses, then os / subprocess, from any value.
    "''.__class__.__mro__[1].__subclasses__()",
    "().__class__.__base__.__subclasses__()",
    "contact.__class__",
    "contact['__class__']",
    "contact|attr('__class__')",
    "(contact|attr('__class__')|attr('__mro__'))",
    "''|attr('\\x5f\\x5fclass\\x5f\\x5f')",
    # Jinja2's own globals carry their module's globals (os is imported there).
    "cycler.__init__.__globals__.os.popen('id').read()",
    "joiner.__init__.__globals__",
    "namespace.__init__.__globals__",
    "lipsum.__globals__['os'].environ",
    "lipsum.__globals__.__builtins__.open('/etc/passwd').read()",
    "range.__self__",
    "dict.__init__",
    # Template internals.
    "self._TemplateReference__context",
    "self.__init__.__globals__",
    "self._TemplateReference__context.environment",
    # Function and frame internals.
    "(contact.get).__self__",
    "contact.get.__globals__",
    "contact.items.__call__",
    # str.format reaching attributes.
    "'{0.__class__.__mro__}'.format(contact)",
    "'{0.__class__}'.format('')",
    "'%s'|format(contact.__class__)",
    "'{x.__class__}'.format_map({'x': ''})",
    # Builtins and modules that are simply not there.
    "__import__('os').environ",
    "open('/etc/passwd').read()",
    "os.environ",
    "config",
    "request.application.__globals__",
    "get_flashed_messages.__globals__",
    "url_for.__globals__",
    "environ",
    "getattr(contact, '__class__')",
    "eval('1')",
    # Mutation (the immutable sandbox).
    "contact.update({'email': 'x'})",
    "contact.pop('email')",
    "contact.custom.setdefault('a', 1)",
    "[1].append(2)",
    # Resource exhaustion.
    "range(10 ** 9) | list",
    "10 ** 10 ** 10",
    "'x' * 10 ** 9",
    "[1] * 10 ** 9",
    "10 ** 10 * 'x'",
]

STATEMENTS = [
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os.environ }}",
    "{% extends '/etc/passwd' %}",
    "{% from 'os' import environ %}{{ environ }}",
    "{% set x = contact.__class__ %}{{ x }}",
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{{ c }}{% endfor %}",
]


@pytest.fixture
def context(tmp_path, monkeypatch):
    monkeypatch.setenv("SANDBOX_SECRET", MARKER)
    (tmp_path / "secret.txt").write_text(MARKER)
    contact = {"email": "a@example.com", "custom": {"path": str(tmp_path / "secret.txt")}}
    return {"type": "reply", "contact": contact, "source": "s", "sender": None}


def harmless(output: str) -> bool:
    forbidden = (MARKER, "<class", "<module", "<function", "<built-in", "environ", "root:")
    return not any(f in output for f in forbidden)


@pytest.mark.parametrize("escape", ESCAPES)
def test_expression_escapes_fail_or_yield_nothing(escape, context):
    try:
        value = ENV.compile_expression(escape)(**context)
    except (SecurityError, jinja2.UndefinedError, jinja2.TemplateError, TypeError, ValueError):
        return  # refused
    except OverflowError:
        return  # range() over its cap
    assert harmless(repr(value)) and harmless(str(value)), (escape, value)
    assert isinstance(value, jinja2.Undefined) or not callable(value) or value in (dict, range)


@pytest.mark.parametrize("escape", ESCAPES)
def test_template_escapes_fail_or_render_nothing(escape, context):
    try:
        out = ENV.from_string("{{ " + escape + " }}").render(**context)
    except (jinja2.TemplateError, TypeError, ValueError, OverflowError):
        return
    assert harmless(out), (escape, out)


@pytest.mark.parametrize("statement", STATEMENTS)
def test_loading_and_importing_finds_nothing(statement, context):
    try:
        out = ENV.from_string(statement).render(**context)
    except (jinja2.TemplateError, TypeError):
        return
    assert harmless(out), (statement, out)


def test_mutation_leaves_the_context_alone(context):
    for escape in ("contact.update({'email': 'x'})", "contact.custom.setdefault('a', 1)"):
        with pytest.raises(SecurityError):
            ENV.compile_expression(escape)(**context)
    assert (
        context["contact"]["email"] == "a@example.com" and "a" not in context["contact"]["custom"]
    )


def test_bounded_arithmetic_still_computes_ordinary_values(context):
    assert ENV.compile_expression("2 ** 10")() == 1024
    assert ENV.compile_expression("'ab' * 3")() == "ababab"
    assert len(ENV.compile_expression(f"'x' * {MAX_SEQUENCE}")()) == MAX_SEQUENCE
    with pytest.raises(SecurityError):
        ENV.compile_expression(f"'x' * {MAX_SEQUENCE + 1}")()


def test_an_escape_in_a_rule_is_a_note_not_a_crash(context):
    rules = RuleSet(
        [
            RuleConfig(
                name="evil",
                when="cycler.__init__.__globals__.os.popen('id').read()",
                connector="hubspot",
            ),
            RuleConfig(
                name="evil-field",
                when="true",
                connector="hubspot",
                fields={"x": "{{ ''.__class__.__mro__[1].__subclasses__() }}"},
            ),
            RuleConfig(name="type-error", when="contact.email > 5", connector="hubspot"),
        ]
    )
    result = rules.evaluate(context)
    assert result.deliveries == []
    assert [n.split(":")[0] for n in result.notes] == [
        "rule 'evil' could not be evaluated",
        "rule 'evil-field'",  # a RuleError: the rule and Jinja2's refusal
        "rule 'type-error' could not be evaluated",
    ]
    assert "access to attribute '__class__'" in result.notes[1]
