"""Reading YAML as a node tree, which keeps the line of every key and value.

Plain yaml.safe_load would lose lines and silently keep the last of two equal
keys, so the validator works on compose()'s nodes and types scalars itself.
"""
from __future__ import annotations

from typing import TypeGuard

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

STR = "tag:yaml.org,2002:str"
INT = "tag:yaml.org,2002:int"
FLOAT = "tag:yaml.org,2002:float"
BOOL = "tag:yaml.org,2002:bool"
NULL = "tag:yaml.org,2002:null"

_scalars = yaml.constructor.SafeConstructor()


class YamlSyntaxError(Exception):
    def __init__(self, line: int | None, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


def compose(text: str) -> Node | None:
    """The document's root node, None for an empty document; raises YamlSyntaxError."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        raise _marked_syntax_error(error) from None
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, error.position) + 1
        raise YamlSyntaxError(line, f"invalid YAML: {str(error).splitlines()[0]}") from None
    except yaml.YAMLError as error:
        raise YamlSyntaxError(None, f"invalid YAML: {str(error).splitlines()[0]}") from None


def _marked_syntax_error(error: yaml.MarkedYAMLError) -> YamlSyntaxError:
    """Report where PyYAML noticed the error, and where the construct it was reading began."""
    mark = error.problem_mark or error.context_mark
    reason = error.problem or error.context or "syntax error"
    if error.problem and error.context:
        context_line = f" at line {error.context_mark.line + 1}" if error.context_mark else ""
        reason = f"{error.problem} ({error.context}{context_line})"
    return YamlSyntaxError(mark.line + 1 if mark else None, f"invalid YAML: {reason}")


def line(node: Node) -> int:
    return node.start_mark.line + 1


def is_str(node: Node) -> TypeGuard[ScalarNode]:
    return isinstance(node, ScalarNode) and node.tag == STR


def is_int(node: Node) -> TypeGuard[ScalarNode]:
    return isinstance(node, ScalarNode) and node.tag == INT


def int_value(node: ScalarNode) -> int:
    return _scalars.construct_yaml_int(node)


def describe(node: Node) -> str:
    """What the user wrote, in words: 'the string "443"', 'the boolean true', 'a list'."""
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, MappingNode):
        return "a mapping"
    if node.tag == NULL:
        return "an empty value"
    if node.tag == STR:
        return f"the string {node.value!r}"
    kinds = {INT: "the integer", FLOAT: "the number", BOOL: "the boolean"}
    if node.tag in kinds:
        return f"{kinds[node.tag]} {node.value}"
    return f"a value tagged {node.tag}"
