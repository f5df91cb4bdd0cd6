"""Griffe extension: render the reST bits of optaxclip's docstrings as Markdown.

The docstrings are Google style with some reST inside. This rewrites, before
mkdocstrings parses them:

* ``:func:`x``` / ``:class:`x``` / ... -> a cross-reference when ``x`` is a
  public name (in ``optaxclip.__all__``), else an inline code span;
* ``Title <url>`_`` hyperlinks -> Markdown links ``[Title](url)``;
* ``:math:`x``` -> inline math ``\\(x\\)`` (pymdownx.arithmatex);
* ``.. math::`` blocks -> ``$$`` display-math blocks;
* ``.. warning::`` / ``.. note::`` blocks -> Material admonitions;
* ``text::`` + indented literal block -> ``text:`` + a fenced Python block;
* a colon in the first line of ``Returns:`` -> an em dash, because the Google
  parser would take the text before it as the return *type*
  (``global_norm``: "A scalar ``jax.Array``: float32, ...").

It only changes the rendered docs; the source docstrings are untouched.
"""

from __future__ import annotations

import ast
import pathlib
import re
from typing import Any

import griffe


def _public_names() -> frozenset[str]:
  """``optaxclip.__all__``, read statically (no jax import at build time)."""
  init = pathlib.Path(__file__).resolve().parent.parent / "optaxclip" / "__init__.py"
  for node in ast.parse(init.read_text()).body:
    if (isinstance(node, ast.Assign)
        and any(getattr(t, "id", None) == "__all__" for t in node.targets)):
      return frozenset(ast.literal_eval(node.value))
  raise RuntimeError(f"no __all__ in {init}")


_PUBLIC = _public_names()
_ROLE = re.compile(r":(\w+):`([^`]+)`")
_DIRECTIVE = re.compile(r"^(\s*)\.\. (math|warning|note|tip|important)::\s*$")
_LITERAL = re.compile(r"^(\s*)(\S.*?)::\s*$")


def _role(match: re.Match[str]) -> str:
  role, target = match.group(1), match.group(2)
  if role == "math":
    return r"\(" + re.sub(r"\s*\n\s*", " ", target) + r"\)"
  name = target.lstrip("~")
  short = name.rsplit(".", 1)[-1]
  if short in _PUBLIC and name in (short, f"optaxclip.{short}"):
    return f"[`{name}`][optaxclip.{short}]"
  return f"`{name}`"


def _indent_of(line: str) -> int:
  return len(line) - len(line.lstrip())


def _directives(text: str) -> str:
  lines = text.split("\n")
  out: list[str] = []
  i = 0
  while i < len(lines):
    line = lines[i]
    directive = _DIRECTIVE.match(line)
    literal = None if directive else _LITERAL.match(line)
    if literal and literal.group(2).startswith(".."):
      literal = None
    if not (directive or literal):
      out.append(line)
      i += 1
      continue
    indent = (directive or literal).group(1)
    j = i + 1
    block: list[str] = []
    while j < len(lines) and (not lines[j].strip()
                              or _indent_of(lines[j]) > len(indent)):
      block.append(lines[j])
      j += 1
    trailing = 0
    while block and not block[-1].strip():
      block.pop()
      trailing += 1
    body_indent = min((_indent_of(l) for l in block if l.strip()), default=0)
    body = [l[body_indent:] if l.strip() else "" for l in block]
    while body and not body[0]:
      body.pop(0)
    if directive and directive.group(2) == "math":
      new = ["$$", *body, "$$"]
    elif directive:
      new = [f"!!! {directive.group(2)}", ""] + ["    " + b if b else ""
                                                  for b in body]
    else:
      out.append(f"{indent}{literal.group(2)}:")
      out.append("")
      new = ["```python", *body, "```"]
    out.extend(indent + n if n else "" for n in new)
    out.extend([""] * trailing)
    i = j
  return "\n".join(out)


_RETURNS_COLON = re.compile(r"^(\s*Returns:[ \t]*\n[ \t]+)([^\n:]+):[ \t]", re.M)


# A reST hyperlink, ``Title <https://...>`_`` (possibly wrapped over lines,
# anonymous with a double underscore), as in the References sections.
_LINK = re.compile(r"`([^`<]+?)\s*<(https?://[^>\s]+)>`__?", re.S)


def _link(match: re.Match[str]) -> str:
  title = re.sub(r"\s+", " ", match.group(1)).strip()
  return f"[{title}]({match.group(2)})"


def rst_to_markdown(text: str) -> str:
  text = _LINK.sub(_link, text)
  text = _ROLE.sub(_role, _directives(text))
  return _RETURNS_COLON.sub(r"\1\2 — ", text)


class RstToMarkdown(griffe.Extension):
  """Rewrites each docstring once, when its object is loaded."""

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    if obj.docstring is not None:
      obj.docstring.value = rst_to_markdown(obj.docstring.value)
