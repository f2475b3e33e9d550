"""The 20 fixed sentences every variant is measured on: short and long, questions, numbers,
names, lists and clause punctuation, so that parity covers what players actually hear."""

from __future__ import annotations

SENTENCES: tuple[str, ...] = (
    "Hello there.",
    "Your order has shipped and should arrive on Thursday.",
    "Turn left in two hundred meters, then keep right at the fork.",
    "Did you remember to lock the back door before we left?",
    "The quick brown fox jumps over the lazy dog.",
    "Please hold while we connect your call to the next available agent.",
    "Welcome back! You have three new messages.",
    "Chapter one: the lighthouse keeper had not seen a ship in eleven years.",
    "Temperatures will fall to four degrees overnight, with light rain by morning.",
    "She sells sea shells by the sea shore, or so the story goes.",
    "Press one for billing, two for support, or stay on the line.",
    "I can't believe it's already the end of the season.",
    "The meeting moved from Monday at nine to Tuesday at half past ten.",
    "Warning: the platform edge is slippery when wet.",
    "Thank you for listening, and see you next week.",
    "Add flour, sugar, and a pinch of salt, then stir until smooth.",
    "Why would anyone leave a perfectly good umbrella on the train?",
    "Gate twelve is now boarding all passengers for the evening flight to Lisbon.",
    "Well, that was unexpected.",
    "Every morning the baker opened the shutters, lit the ovens, and waited for the first "
    "knock at the door, long before the town was awake.",
)
