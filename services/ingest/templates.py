"""Ready-to-paste Klientiks URL templates, the seeds' parameters with the seeds' mistakes fixed."""

from __future__ import annotations

from services.common.events import EventName

# `appointment.time={{appointment_time}}` and `{appointment.status}}` in the seeds are fixed here.
TEMPLATES: dict[EventName, str] = {
    EventName.CLIENT_CREATED: (
        "client_id={{id}}&client_phone={{phone}}&client_name={{name}}&client_first_name={{first_name}}"
        "&client_patron_name={{patron_name}}&client_second_name={{second_name}}&client_deleted={{deleted}}"
        "&client_email={{email}}"
    ),
    EventName.APPOINTMENT_CREATED: (
        "client_id={{client.id}}&client_phone={{client.phone}}&client_name={{client.name}}"
        "&appointment_id={{appointment.id}}&appointment_date={{appointment.date}}"
        "&appointment_time={{appointment.time}}&executor_name={{executor_name}}&executor_phone={{executor_phone}}"
        "&services={{services}}&appointment_total_cost={{appointment.total_cost}}&user_position={{user.position}}"
    ),
    EventName.ONLINE_BOOKING: (
        "appointment_id={{#appointment}}{{id}}{{/appointment}}&status={{#new_data}}{{status}}{{/new_data}}"
    ),
    EventName.APPOINTMENT_CHANGED: (
        "appointment_id={{#new_data}}{{id}}{{/new_data}}&status={{#new_data}}{{status}}{{/new_data}}"
    ),
    EventName.INVOICE_CREATED: (
        "client_id={{client_id}}&client_name={{client.name}}&client_phone={{client.phone}}"
        "&appointment_id={{object_id}}&appointment_amount={{amount}}&appointment_paid={{paid}}"
        "&appointment_name={{name}}&appointment_description={{description}}&appointment_paid_sum={{paid_sum}}"
        "&appointment_left_to_pay={{left_to_pay}}"
    ),
    EventName.VISIT_PAID: (
        "client_id={{client_id}}&appointment_id={{appointment.id}}&appointment_account_id={{appointment.account_id}}"
        "&appointment_created={{appointment.created}}&appointment_appointment_id={{appointment.appointment_id}}"
        "&appointment_status={{appointment.status}}&appointment_paid={{appointment.paid}}"
    ),
}

TITLES: dict[EventName, str] = {
    EventName.CLIENT_CREATED: "Добавление клиента",
    EventName.APPOINTMENT_CREATED: "Запись клиента на прием",
    EventName.ONLINE_BOOKING: "Онлайн-запись через виджет",
    EventName.APPOINTMENT_CHANGED: "Перенос визита, изменение длительности, изменение статуса",
    EventName.INVOICE_CREATED: "Создание счета на оплату",
    EventName.VISIT_PAID: "Визит клиента оплачен",
}


def webhook_url(base_url: str, token: str, event: EventName) -> str:
    """The URL to paste into Klientiks' "Адрес запроса" for ``event``."""
    return f"{base_url.rstrip('/')}/hooks/klientiks/{token}/{event.value}?{TEMPLATES[event]}"
