"""A labelled retrieval fixture for `doppel bench recall`: questions whose answering snippet is known, in Russian
and English, among distractors written to confuse (other cats, other trips, other deadlines).

`ACROSS`: the question in one language, the answer told in the other. `SAME`: both in one language, with other
forms of the words (кота / кот), names and paraphrases. Written for doppel, before any method was run on it.
"""

from __future__ import annotations

ACROSS = [
    ("how's Persik?", "у меня кот Персик заболел, везу его к ветеринару в субботу"),
    ("как кот?", "у меня кот Персик заболел, везу его к ветеринару в субботу"),
    ("когда летите в Лиссабон?", "we fly to Lisbon on the 12th, back on the 20th"),
    ("when is your deadline?", "the thesis is due March 3, I'm so behind on chapter two"),
    ("как там с квартирой, нашли?", "мы наконец сняли двушку на Петроградке, переезжаем в конце месяца"),
    ("what did the doctor say about your knee?", "врач сказал что у меня разрыв мениска, нужна операция на колене"),
    ("ты ещё ходишь на бокс?", "бросил бокс, теперь хожу на скалодром три раза в неделю"),
    ("did you get the job at Yandex?", "мне сделали оффер в Яндекс, выхожу с понедельника"),
    ("что подарить маме на день рождения?", "mom's birthday is on Sunday, thinking of getting her a kindle"),
    ("how was the concert?", "концерт Земфиры был огонь, мы стояли прямо у сцены"),
    ("сколько стоил ремонт машины?", "the car repair cost me 80k rubles, the gearbox was dead"),
    ("are you still learning Spanish?", "я продолжаю учить испанский, занимаюсь с репетитором по вторникам"),
    ("where are you celebrating New Year?", "Новый год встречаем у родителей на даче, приезжай"),
    ("как прошла защита?", "defended my thesis today!!! the committee gave me an excellent grade"),
]
SAME = [
    ("как там Персик, выздоровел?", "у меня кот Персик заболел, везу его к ветеринару в субботу"),
    ("когда вы в Лиссабоне?", "мы летим в Лиссабон двенадцатого, обратно двадцатого"),
    ("when is the thesis due?", "the thesis is due March 3, I'm so behind on chapter two"),
    ("вы уже переехали на Петроградку?", "мы наконец сняли двушку на Петроградке, переезжаем в конце месяца"),
    ("как колено после операции?", "врач сказал что у меня разрыв мениска, нужна операция на колене"),
    ("how often do you go climbing?", "quit boxing, now I go to the climbing gym three times a week"),
    ("как тебе в Яндексе работается?", "мне сделали оффер в Яндекс, выхожу с понедельника"),
    ("did your mom like the kindle?", "mom's birthday is on Sunday, thinking of getting her a kindle"),
    ("ты ещё слушаешь Земфиру?", "концерт Земфиры был огонь, мы стояли прямо у сцены"),
    ("is the gearbox fixed now?", "the car repair cost me 80k rubles, the gearbox was dead"),
    ("как успехи с репетитором?", "я продолжаю учить испанский, занимаюсь с репетитором по вторникам"),
    ("поедем к вам на дачу?", "Новый год встречаем у родителей на даче, приезжай"),
    ("what grade did the committee give you?", "defended my thesis today!!! the committee gave me an excellent grade"),
    ("how are the puppies?", "Lena's dog had puppies, do you want one?"),
]
DISTRACTORS = [
    "кот соседа опять орал всю ночь под окном", "look at this cat video lol",
    "we flew to Berlin last year, it was rainy the whole time", "летим в Стамбул в мае, уже купили билеты",
    "the project deadline got moved to Friday", "дедлайн по отчёту в пятницу, не успеваю",
    "квартира у друзей огромная, но далеко от метро", "my knee is fine, just did a 10k run",
    "на работе завал, релиз в четверг", "Yandex maps says we'll be there in 20 minutes", "купил маме цветы просто так",
    "the concert tickets sold out in an hour", "машину помыл наконец-то", "Spanish food is overrated honestly",
    "на Новый год хотим в горы, но пока не решили", "my thesis advisor is on vacation until next week",
    "привет! как дела?", "ok see you tomorrow", "ахахах ну ты даёшь", "can you send me the photos from Saturday?",
    "я заказал пиццу, будешь?", "the weather is insane today, +30", "скинь номер сантехника плиз",
    "I started reading Dune, it's slow but good", "погуляем в выходные?", "my phone died, call you later",
    "в спортзал сегодня не пойду, устал", "the meeting with the landlord is at 6",
    "собака у Лены родила щенков, хочешь одного?", "watching the new season of Severance",
    "зарплату опять задержали на неделю", "I'm learning to cook risotto", "мы с Димой поругались из-за ерунды",
    "the train was delayed by two hours", "давай созвонимся вечером", "got a new bike, going to ride to work",
    "у бабушки день рождения в среду", "the dentist appointment is moved to Tuesday", "сегодня наконец выспался",
    "have you seen the new Nolan movie?", "у Персиковых сегодня новоселье, идёшь?", "в Лиссабоне сейчас +25, завидую",
    "my sister's thesis is on medieval poetry", "на Петроградке открыли новую кофейню", "колено ноет к дождю",
    "the gym is closed for renovation this week", "в Яндексе опять сбой, такси не вызвать", "mom called, she says hi",
    "the committee meeting is postponed", "кот у Оли научился открывать холодильник",
]
