"""A chat with tools as messages a chat template can render (runtime.core.tools).

A template that reads ``tools`` gets them as OpenAI's ``tools`` objects (:func:`template_tools`)
and the messages as they are. For one that does not, :func:`messages_with_tools` writes the tools
into the system message (:func:`runtime.core.tools.tool_system_prompt`: after the caller's own
system text, or as a system message of its own at the start) and an assistant turn's calls into
its content as the ``<tool_call>`` text the model would have written; tool turns stay tool turns.
"""

from __future__ import annotations

from typing import Any

from runtime.core.messages import ChatMessage, ChatRequest
from runtime.core.tools import call_text, tool_system_prompt

__all__ = ["messages_with_tools", "template_tools", "uses_tools"]


def uses_tools(request: ChatRequest) -> bool:
    """Whether the request's tools or its history's calls change the prompt."""
    return bool(request.tools) or any(m.tool_calls for m in request.messages)


def template_tools(request: ChatRequest) -> list[dict[str, Any]]:
    """The request's tools as OpenAI's ``tools`` objects, for a template that renders them."""
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in request.tools
    ]


def messages_with_tools(request: ChatRequest) -> tuple[ChatMessage, ...]:
    """The request's messages with its tools and calls written as text (see the module docstring)."""
    out = [
        ChatMessage(role=m.role, content=m.content + "".join(call_text(c) for c in m.tool_calls))
        if m.tool_calls
        else m
        for m in request.messages
    ]
    if request.tools:
        shown = tool_system_prompt(request.tools, request.tool_choice)
        if out and out[0].role == "system":
            out[0] = ChatMessage(role="system", content=f"{out[0].content}\n\n{shown}")
        else:
            out.insert(0, ChatMessage(role="system", content=shown))
    return tuple(out)
