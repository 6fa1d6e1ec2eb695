"""Realistic Klientiks webhook parameters (Russian names, phones as Klientiks sends them) for demos and tests."""

from __future__ import annotations

import random
from urllib.parse import urlencode

_FIRST_F = ["Анна", "Мария", "Екатерина", "Ольга", "Наталья", "Ирина", "Светлана", "Юлия", "Дарья", "Алина"]
_FIRST_M = ["Иван", "Алексей", "Дмитрий", "Сергей", "Андрей", "Михаил", "Никита", "Павел"]
_LAST = [
    "Иванов",
    "Смирнов",
    "Кузнецов",
    "Попов",
    "Соколов",
    "Лебедев",
    "Козлов",
    "Новиков",
    "Морозов",
    "Волков",
]
_PATRON = ["Сергеев", "Александров", "Дмитриев", "Андреев", "Игорев", "Олегов"]
_MOBILE_CODES = ["903", "905", "915", "916", "925", "926", "985", "999"]
_DOMAINS = ["mail.ru", "yandex.ru", "gmail.com", "bk.ru"]


def client_params(i: int, *, seed: int = 7) -> dict[str, str]:
    """Parameters of the "Добавление клиента" template for client number ``i`` (deterministic)."""
    rnd = random.Random(seed * 1_000_003 + i)
    female = rnd.random() < 0.75  # salons: mostly women
    first = rnd.choice(_FIRST_F if female else _FIRST_M)
    last = rnd.choice(_LAST) + ("а" if female else "")
    patron = rnd.choice(_PATRON) + ("на" if female else "ич")
    patron = patron.replace("ев" + "на", "евна").replace("ов" + "на", "овна")
    # Codes of the big mobile operators: every number in them is valid by phonenumbers' metadata.
    digits = f"{rnd.choice(_MOBILE_CODES)}{rnd.randrange(10**7):07d}"
    # Klientiks stores phones as bare digits; people also type "8 (9xx) ..." by hand.
    phone = (
        f"7{digits}" if rnd.random() < 0.7 else f"8 ({digits[:3]}) {digits[3:6]}-{digits[6:8]}-{digits[8:]}"
    )
    return {
        "client_id": str(6_400_000 + i),
        "client_phone": phone,
        "client_name": f"{last} {first} {patron}",
        "client_first_name": first,
        "client_patron_name": patron,
        "client_second_name": last,
        "client_deleted": "false",
        "client_email": f"client{i}@{rnd.choice(_DOMAINS)}",
    }


def query(params: dict[str, str]) -> str:
    return urlencode(params)
