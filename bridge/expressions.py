"""The expression language of rules: Jinja2 in its immutable sandbox, and how it is run.

Conditions and templates are compiled once, when the config loads. At run time one `Scope` per
event holds its variables; the usual shapes (a path of names, string filters, comparisons of a
path with constants, `and`/`or`/`not`, the string tests) run as plain Python over the event's
dicts, with Jinja2's exact results (the sandbox's own attribute lookup for anything but a dict,
Jinja2's undefined values for missing fields); everything else runs in Jinja2 itself.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable, Iterator
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bridge import filters

MAX_SIZE = 100_000  # the longest string or list `*` may build
# What a user's expression or template may raise besides Jinja2's errors (range too big, a
# division by zero, comparing a number with text): the event gets a note, the router goes on.
RULE_FAILURES = (
    jinja2.TemplateError,
    ArithmeticError,
    TypeError,
    ValueError,
    LookupError,
    AttributeError,
)


def _finalize(value: Any) -> Any:
    # Jinja would print None as "None"; a missing value must map to nothing.
    return "" if value is None else value


class RuleEnvironment(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, with `*` and `**` bounded: `'x' * 10**9` cannot eat the
    memory of the daemon, and with our filters and tests. No loader: nothing can be read."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        if operator_ == "**":
            if isinstance(right, int | float) and abs(right) > 64:
                raise jinja2.exceptions.SecurityError("exponent too large")
            return operator.pow(left, right)
        if isinstance(left, int) and isinstance(right, str | list | tuple):
            left, right = right, left
        if isinstance(left, str | list | tuple) and isinstance(right, int):
            if len(left) * right > MAX_SIZE:
                raise jinja2.exceptions.SecurityError("result too large")
        return operator.mul(left, right)


ENV = RuleEnvironment(undefined=jinja2.ChainableUndefined, finalize=_finalize, autoescape=False)
for _name in filters.NULL_SAFE:
    # Jinja2's string filters turn null into "None": a contact's null field must stay empty.
    ENV.filters[_name] = filters.null_safe(ENV.filters[_name])
ENV.filters.update(filters.FILTERS)
ENV.tests.update(filters.TESTS)
for _unused in ("lipsum", "cycler", "joiner", "namespace"):
    ENV.globals.pop(_unused, None)


def is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


class Template:
    """A compiled template. When every part of it is text or an expression `_compile` knows
    (`Replied to {{ CampaignId }}`, `{{ contact.first_name | trim | title }}`), it is rendered
    as Python over the event's dicts, with exactly Jinja2's result; otherwise by Jinja2."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.jinja = ENV.from_string(source)
        self.parts: list[str | _Compiled] | None = None
        body = ENV.parse(source).body
        if not body:
            self.parts = []
        elif len(body) == 1 and isinstance(body[0], nodes.Output):
            parts: list[str | _Compiled] = []
            for node in body[0].nodes:
                if isinstance(node, nodes.TemplateData):
                    parts.append(node.data)
                elif (compiled := _compile(node)) is not None:
                    parts.append(compiled)
                else:
                    return
            self.parts = parts

    def render(self, variables: dict[str, Any]) -> str:
        assert self.parts is not None
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                value = part(variables)
                out.append("" if value is None else str(value))  # as `_finalize`, then str()
        return "".join(out)


class Scope:
    """One event's variables as a Jinja2 context, built once and shared by every condition and
    template of every rule: a context per call (what `Template.render` makes) would cost more
    than most rules do. Whatever a template sets is cleared after it, so rules never see each
    other's variables."""

    def __init__(self, variables: dict[str, Any]) -> None:
        self.variables = variables
        self._jinja: jinja2.runtime.Context | None = None

    @property
    def _context(self) -> jinja2.runtime.Context:
        if self._jinja is None:
            parent = {**ENV.globals, **self.variables}
            self._jinja = ENV.context_class(ENV, parent, "rule", {}, globals=ENV.globals)
        return self._jinja

    def render(self, template: Template | jinja2.Template) -> str:
        if isinstance(template, Template):
            if template.parts is not None:
                return template.render(self.variables)
            template = template.jinja
        try:
            return ENV.concat(template.root_render_func(self._context))
        finally:
            self._context.vars.clear()
            self._context.exported_vars.clear()

    def holds(self, condition: jinja2.Template) -> bool:
        """The truth of a condition compiled by `compile_condition`."""
        try:
            for _ in condition.root_render_func(self._context):
                pass
            return bool(self._context.vars.get("result"))
        finally:
            self._context.vars.clear()
            self._context.exported_vars.clear()


def compile_condition(source: str) -> jinja2.Template:
    """`source` as a template that stores the expression's value in `result` (what
    `Environment.compile_expression` builds), to run in a shared `Scope`."""
    expression = ENV.compile_expression(source)
    return expression._template


def _unknown_name(exc: jinja2.TemplateSyntaxError) -> str:
    """`No filter named 'lowr'.` with the closest known one."""
    message = exc.message or str(exc)
    for kind, known in (("filter", ENV.filters), ("test", ENV.tests)):
        prefix = f"No {kind} named '"
        if message.startswith(prefix):
            name = message[len(prefix) :].split("'", 1)[0]
            hint = difflib.get_close_matches(name, list(known), n=1)
            return f"unknown {kind} {name!r}" + (f" (did you mean `{hint[0]}`?)" if hint else "")
    if "'='" in message:
        message += " (compare with ==)"
    return message


def _ast_problems(tree: nodes.Node) -> Iterator[str]:
    """What parses but may not run: reading templates, and regular expressions that fail."""
    for node in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        yield f"{type(node).__name__.lower()} is not allowed: rules cannot read files"
    for _block in tree.find_all(nodes.Block):
        yield "block is not allowed in a rule's template"
    for test in tree.find_all(nodes.Test):
        if test.name in filters.REGEX_TESTS and test.args:
            pattern = test.args[0]
            if isinstance(pattern, nodes.Const) and isinstance(pattern.value, str):
                problem = filters.check_pattern(pattern.value)
                if problem:
                    yield problem


def check_source(source: str, expression: bool) -> str | None:
    try:
        if expression:
            try:
                ENV.compile_expression(source)
            except jinja2.TemplateSyntaxError as exc:
                if exc.message == "chunk after expression":  # say what came after it
                    ENV.parse("{{ " + source + " }}")
                raise
        else:
            ENV.from_string(source)
        tree = ENV.parse("{{ (" + source + ") }}" if expression else source)
        for problem in _ast_problems(tree):
            return problem
    except jinja2.TemplateSyntaxError as exc:
        kind = "expression" if expression else "template"
        return f"invalid {kind}: {_unknown_name(exc)}"
    return None


def types_required(expr: nodes.Node) -> frozenset[str] | None:
    """The event types an expression can be true for, when it says so at its top level
    (`type == 'reply' and ...`, `type in ('open', 'click') or type == 'reply'`); None if any.
    Lets the engine skip most rules of a large file without evaluating them."""
    if isinstance(expr, nodes.And):
        left, right = types_required(expr.left), types_required(expr.right)
        if left is None or right is None:
            return left if right is None else right
        return left & right
    if isinstance(expr, nodes.Or):
        left, right = types_required(expr.left), types_required(expr.right)
        return None if left is None or right is None else left | right
    if (
        isinstance(expr, nodes.Compare)
        and isinstance(expr.expr, nodes.Name | nodes.Getattr)
        and _is_type_name(expr.expr)
        and len(expr.ops) == 1
    ):
        op = expr.ops[0]
        if op.op == "eq" and isinstance(op.expr, nodes.Const) and isinstance(op.expr.value, str):
            return frozenset([op.expr.value])
        if op.op == "in" and isinstance(op.expr, nodes.Tuple | nodes.List):
            items = op.expr.items
            if all(isinstance(i, nodes.Const) and isinstance(i.value, str) for i in items):
                return frozenset(i.value for i in items)  # type: ignore[attr-defined]
    return None


def _is_type_name(node: nodes.Node) -> bool:
    """`type` or `event.type`."""
    if isinstance(node, nodes.Name):
        return node.name == "type"
    return (
        isinstance(node, nodes.Getattr)
        and node.attr == "type"
        and isinstance(node.node, nodes.Name)
        and node.node.name == "event"
    )


def parse_condition(source: str) -> nodes.Node:
    """The expression's syntax tree (for the type shortcut and for `simulate`'s reasons)."""
    output = ENV.parse("{{ (" + source + ") }}").body[0]
    assert isinstance(output, nodes.Output)
    return output.nodes[0]


# Names a dict has as attributes: Jinja2 looks attributes up before items, so `contact.items`
# is the method, not a field called "items". Paths through such names go to Jinja2.
_DICT_ATTRIBUTES = frozenset(dir(dict))
_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "gt": operator.gt,
    "lteq": operator.le,
    "gteq": operator.ge,
    "in": lambda a, b: a in b,
    "notin": lambda a, b: a not in b,
}
_Compiled = Callable[[dict[str, Any]], Any]


def _walk(variables: dict[str, Any], path: tuple[str, ...]) -> Any:
    """What Jinja2 gives for `a.b.c`: the sandbox's lookup, undefined when missing."""
    if path[0] in variables:
        value = variables[path[0]]
    elif path[0] in ENV.globals:
        value = ENV.globals[path[0]]
    else:
        return ENV.undefined(name=path[0])
    for name in path[1:]:
        if type(value) is dict and name not in _DICT_ATTRIBUTES:
            value = value[name] if name in value else ENV.undefined(obj=value, name=name)
        else:
            value = ENV.getattr(value, name)
    return value


def _getter(path: tuple[str, ...]) -> _Compiled:
    """`_walk` for `path`; a path of two names through a dict, the usual `contact.email`,
    without the loop."""
    if len(path) == 2 and path[1] not in _DICT_ATTRIBUTES:
        top, name = path

        def get(variables: dict[str, Any]) -> Any:
            value = variables.get(top)
            if type(value) is dict:
                return value[name] if name in value else ENV.undefined(obj=value, name=name)
            return _walk(variables, path)

        return get
    return lambda variables: _walk(variables, path)


def _path(node: nodes.Node) -> tuple[str, ...] | None:
    names: list[str] = []
    while isinstance(node, nodes.Getattr):
        names.append(node.attr)
        node = node.node
    if isinstance(node, nodes.Name) and node.ctx == "load":
        return (node.name, *reversed(names))
    return None


def _compile(node: nodes.Node) -> _Compiled | None:  # noqa: C901  # one branch per node type
    """`node` as a Python function of the variables, or None if Jinja2 must run it."""
    if isinstance(node, nodes.Name | nodes.Getattr):
        path = _path(node)
        return None if path is None else _getter(path)
    if isinstance(node, nodes.Const):
        return lambda v, c=node.value: c  # type: ignore[misc]
    if isinstance(node, nodes.Tuple | nodes.List):
        if not all(isinstance(i, nodes.Const) for i in node.items):
            return None
        items = [i.value for i in node.items]  # type: ignore[attr-defined]
        value = tuple(items) if isinstance(node, nodes.Tuple) else items
        return lambda v, c=value: c  # type: ignore[misc]
    if isinstance(node, nodes.Not):
        inner = _compile(node.node)
        return None if inner is None else (lambda v: not inner(v))
    if isinstance(node, nodes.And | nodes.Or):
        left, right = _compile(node.left), _compile(node.right)
        if left is None or right is None:
            return None
        if isinstance(node, nodes.And):
            return lambda v: left(v) and right(v)
        return lambda v: left(v) or right(v)
    if isinstance(node, nodes.Compare):
        return _compile_compare(node)
    if isinstance(node, nodes.Test | nodes.Filter) and node.node is not None:
        known = ENV.tests if isinstance(node, nodes.Test) else ENV.filters
        fn: Any = known.get(node.name)
        # Those that want the context or the environment, and keyword arguments, go to Jinja2.
        if fn is None or hasattr(fn, "jinja_pass_arg") or node.kwargs:
            return None
        if node.dyn_args or node.dyn_kwargs:
            return None
        subject = _compile(node.node)
        compiled = [_compile(a) for a in node.args]
        args = [a for a in compiled if a is not None]
        if subject is None or len(args) != len(compiled):
            return None
        return lambda v: fn(subject(v), *(a(v) for a in args))
    return None


def _compile_compare(node: nodes.Compare) -> _Compiled | None:
    first = _compile(node.expr)
    ops: list[tuple[Callable[[Any, Any], Any], _Compiled]] = []
    for operand in node.ops:
        fn, arg = _COMPARE.get(operand.op), _compile(operand.expr)
        if fn is None or arg is None:
            return None
        ops.append((fn, arg))
    if first is None:
        return None
    if len(ops) == 1:  # the usual `contact.interest == 'interested'`, without a loop
        (fn, arg), right = ops[0], node.ops[0].expr
        if isinstance(right, nodes.Const | nodes.Tuple | nodes.List):
            constant = arg({})
            return lambda v: fn(first(v), constant)
        return lambda v: fn(first(v), arg(v))

    def compare(v: dict[str, Any]) -> Any:
        left = first(v)
        for fn, arg in ops:
            right = arg(v)
            if not fn(left, right):
                return False
            left = right
        return True

    return compare


class Condition:
    """A rule's `when`, compiled: as Python when its shape allows (see the module docstring),
    else as Jinja2's compiled expression."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.jinja = compile_condition(source)
        self.python = _compile(parse_condition(source))

    def holds(self, scope: Scope) -> bool:
        if self.python is not None:
            return bool(self.python(scope.variables))
        return scope.holds(self.jinja)
