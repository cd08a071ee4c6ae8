"""Twenty JSON schemas and prompts for the structured-output tests on the embedded model, and
twenty tool-call cases: nested objects, arrays with minItems, enums, required fields, numbers
with bounds, strings with patterns. Strings and arrays are bounded so that every answer ends
within a short max_tokens."""

from __future__ import annotations

from typing import Any

from runtime.core.tools import NamedTool, Tool, ToolChoice

S = {"type": "string", "maxLength": 24}
"""A short string."""


def obj(required: bool = True, **props: Any) -> dict[str, Any]:
    """An object schema with these properties (all required unless ``required`` is False)."""
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = list(props)
    return out


SCHEMA_CASES: list[tuple[str, dict[str, Any]]] = [
    ("Describe a person.", obj(name=S, age={"type": "integer", "minimum": 0, "maximum": 120})),
    ("Give a city and its country.", obj(city=S, country=S)),
    ("Pick a colour.", obj(colour={"enum": ["red", "green", "blue"]})),
    ("Is the sky blue?", obj(answer={"type": "boolean"})),
    ("Rate a film from 1 to 5.", obj(title=S, stars={"type": "integer", "minimum": 1, "maximum": 5})),
    ("List two fruits.", obj(fruits={"type": "array", "items": S, "minItems": 2, "maxItems": 3})),
    ("Give a point.", obj(point=obj(x={"type": "number", "minimum": -10, "maximum": 10},
                                    y={"type": "number", "minimum": -10, "maximum": 10}))),
    ("Give a product code.", obj(code={"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"})),
    ("Describe a book.", obj(book=obj(title=S, author=obj(first=S, last=S)))),
    ("Give three small numbers.", obj(numbers={"type": "array", "items": {"type": "integer", "minimum": 0,
                                   "maximum": 9}, "minItems": 3, "maxItems": 3})),
    ("What is the temperature?", obj(celsius={"type": "number", "minimum": -50, "maximum": 60},
                                      unit={"enum": ["C"]})),
    ("Make a to-do item.", obj(task=S, done={"type": "boolean"}, priority={"enum": ["low", "high"]})),
    ("Give a date.", obj(date={"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"})),
    ("Describe a pet.", obj(kind={"enum": ["cat", "dog", "fish"]}, name=S, legs={"type": "integer",
                             "minimum": 0, "maximum": 4})),
    ("Give an email address.", obj(email={"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"})),
    ("List two tags.", obj(tags={"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2,
                                "maxItems": 2})),
    ("Describe a team.", obj(team=S, members={"type": "array", "items": obj(name=S), "minItems": 1,
                                               "maxItems": 2})),
    ("Give a price.", obj(amount={"type": "number", "minimum": 0, "maximum": 1000},
                          currency={"enum": ["EUR", "USD"]})),
    ("Say hello.", obj(required=False, greeting=S)),
    ("Describe the weather.", obj(sky={"enum": ["sunny", "cloudy", "rainy"]}, wind=obj(speed={"type":
                                  "integer", "minimum": 0, "maximum": 200}, direction={"enum": ["N", "S", "E", "W"]}))),
]  # fmt: skip

WEATHER = Tool(
    name="get_weather",
    description="The current weather in a city",
    parameters=obj(city=S, unit={"enum": ["celsius", "fahrenheit"]}),
)
ADD = Tool(
    name="add",
    description="Add two integers",
    parameters=obj(a={"type": "integer", "minimum": -1000, "maximum": 1000},
                   b={"type": "integer", "minimum": -1000, "maximum": 1000}),
)  # fmt: skip
SEARCH = Tool(
    name="search",
    description="Search the web",
    parameters=obj(query=S, limit={"type": "integer", "minimum": 1, "maximum": 10}),
)
TOOLS = (WEATHER, ADD, SEARCH)
_PROMPTS = [
    "What is the weather in Paris?", "Add 2 and 3.", "Search for cheap flights.", "Is it raining in Oslo?",
    "What is 10 plus 32?", "Find recipes for soup.", "How cold is it in Montreal?", "Sum 7 and 8.",
    "Look up the news.", "Weather in Tokyo, please.",
]  # fmt: skip
TOOL_CASES: list[tuple[str, ToolChoice]] = [(p, "required") for p in _PROMPTS] + [
    (p, NamedTool(name=t.name)) for p, t in zip(_PROMPTS, [WEATHER, ADD, SEARCH] * 4, strict=False)
]
"""Twenty (prompt, tool_choice): ten required, ten naming a function."""
